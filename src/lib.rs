//! rbee turns the machines someone already has into one LLM inference cluster
//! for GGUF models. One executable, several roles; see ARCHITECTURE.md for the
//! map and DESIGN.md for the wire formats.

pub mod http;
pub mod protocol;
pub mod worker;

/// Whether this binary was built with a GPU backend (CUDA or Metal).
pub const GPU_BACKEND: bool = cfg!(any(feature = "cuda", feature = "metal"));

/// The llama.cpp backends compiled into this binary, for `rbee --version`.
pub const BACKENDS: &str = env!("RBEE_BACKENDS");
