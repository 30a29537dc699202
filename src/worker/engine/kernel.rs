//! rbee's attention kernel in llama.cpp's CPU backend (`vendor/ggml-cpu`):
//! which kernel serves (`RBEE_ATTN_KERNEL=upstream` turns rbee's off and
//! leaves flash attention on, with llama.cpp's own kernel), and its name for
//! `rbee --version`, the worker's log, `/props` and `/metrics`.
//!
//! The kernel's C entry points are declared here, in code every build runs:
//! a binary built without the kernel (`cargo install` without the repository's
//! `.cargo/config.toml`, CMake older than 3.19, a system ggml) fails to link
//! instead of running without it unnoticed.

extern "C" {
    /// Defined beside the kernel (flash_attn_small.cpp).
    fn rbee_flash_attn_small_enable(on: bool);
    /// How many attention ops the kernel computed in graphs this thread ran.
    fn rbee_flash_attn_small_calls() -> u64;
}

/// The environment variable that picks the kernel.
pub const ENV: &str = "RBEE_ATTN_KERNEL";

/// rbee's kernel, as `rbee --version` lists it.
pub const NAME: &str = "fa-small";

/// Which kernel computes llama.cpp's flash attention for the shapes rbee's takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// rbee's small-batch kernel, upstream's for every other shape.
    Rbee,
    /// llama.cpp's own, for every shape.
    Upstream,
}

impl Kernel {
    /// The kernel `RBEE_ATTN_KERNEL` asks for: unset or `fa-small` rbee's,
    /// `upstream` llama.cpp's.
    pub fn from_env() -> Result<Kernel, String> {
        Kernel::parse(std::env::var(ENV).ok().as_deref())
    }

    fn parse(value: Option<&str>) -> Result<Kernel, String> {
        match value.map(str::trim) {
            None | Some("") | Some(NAME) => Ok(Kernel::Rbee),
            Some("upstream") => Ok(Kernel::Upstream),
            Some(other) => Err(format!(
                "{ENV} is {NAME} (rbee's attention kernel, the default) or upstream \
                 (llama.cpp's), not {other:?}"
            )),
        }
    }

    /// This kernel serves the attention ops that this process computes from now on.
    pub fn serve(self) {
        // SAFETY: sets an atomic flag in the kernel; callable at any time.
        unsafe { rbee_flash_attn_small_enable(self == Kernel::Rbee) }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kernel::Rbee => NAME,
            Kernel::Upstream => "upstream",
        }
    }
}

/// How many attention ops rbee's kernel computed in graphs this thread ran.
pub fn calls() -> u64 {
    // SAFETY: reads a thread-local counter; callable at any time.
    unsafe { rbee_flash_attn_small_calls() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_names_a_kernel_or_is_refused() {
        assert_eq!(Kernel::parse(None), Ok(Kernel::Rbee));
        assert_eq!(Kernel::parse(Some("fa-small")), Ok(Kernel::Rbee));
        assert_eq!(Kernel::parse(Some(" upstream ")), Ok(Kernel::Upstream));
        let e = Kernel::parse(Some("off")).unwrap_err();
        assert!(
            e.contains("RBEE_ATTN_KERNEL") && e.contains("upstream"),
            "{e}"
        );
    }

    #[test]
    fn the_revision_names_the_kernels_sources() {
        use sha2::{Digest, Sha256};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("vendor/ggml-cpu");
        let mut sources = Sha256::new();
        for file in ["flash_attn_small.cpp", "rbee.cmake"] {
            sources.update(std::fs::read(dir.join(file)).expect("the kernel's sources"));
        }
        let rev = crate::disk::hex(&sources.finalize())[..16].to_string();
        assert_eq!(
            option_env!("GGML_RBEE_KERNEL_REV"),
            Some(rev.as_str()),
            "vendor/ggml-cpu changed: set GGML_RBEE_KERNEL_REV = \"{rev}\" in .cargo/config.toml \
             (llama.cpp is then rebuilt with the kernel as it now is)"
        );
    }
}
