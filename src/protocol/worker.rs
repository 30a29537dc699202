//! A hive → the worker it spawns, and back: the flags and environment a hive
//! passes (flash attention, slots and context, the secret, a split's tunnels),
//! the worker's loading progress and its ready callback.

use super::*;
use serde::{Deserialize, Serialize};

/// One event of a worker's `GET /v1/loading/progress` stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum LoadingEvent {
    /// Weights going to a GPU.
    LoadingToVram {
        layers_loaded: u32,
        layers_total: u32,
        vram_mb: u64,
    },
    /// Weights going to main memory (a CPU worker).
    LoadingToRam {
        layers_loaded: u32,
        layers_total: u32,
        ram_mb: u64,
    },
    Ready,
    Failed {
        message: String,
    },
}

/// `GET /v1/ready` on a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadyStatus {
    pub ready: bool,
    pub state: WorkerState,
    pub progress_url: String,
    pub model: String,
    pub slots_total: u32,
    pub slots_busy: u32,
    pub queue_len: u32,
    /// Idle conversations kept in the prompt cache, and their tokens.
    #[serde(default)]
    pub cached_sequences: u32,
    #[serde(default)]
    pub cached_tokens: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a worker POSTs to its `--callback-url` once loading has ended, either way.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerReadyCallback {
    pub worker_id: String,
    /// The secret its hive started it with (`RBEE_WORKER_SECRET`): only the
    /// worker itself can report on itself.
    #[serde(default)]
    pub secret: String,
    pub url: String,
    pub model: String,
    pub slots: u32,
    /// `Ready` or `Failed`.
    pub state: WorkerState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Whether llama.cpp's attention uses its flash-attention kernel.
///
/// `Auto` (llama.cpp's choice, and llama-server's default) turns it on on a
/// CPU too, where it is a trade: SmolLM2 on 2 cores generates at 87 tokens/s
/// with it and 80 without from an empty context, but 39 against 68 with 1,450
/// tokens in, and reads a chat's 18 new prompt tokens at that depth at 87
/// against 152 tokens/s (llama-bench `-d 0,1450 -fa 0,1`); through the worker,
/// 8 short streams make 135 tokens/s with it and 106 without. The KV cache's
/// layout depends on it, so it is fixed for the life of the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashAttn {
    On,
    Off,
    /// llama.cpp's choice: on where the device supports it.
    Auto,
}

impl FlashAttn {
    /// The flag's value: `on`, `off` or `auto`.
    pub fn parse(value: &str) -> Result<FlashAttn, String> {
        match value {
            "on" => Ok(FlashAttn::On),
            "off" => Ok(FlashAttn::Off),
            "auto" => Ok(FlashAttn::Auto),
            other => Err(format!("flash attention is on, off or auto, not {other:?}")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FlashAttn::On => "on",
            FlashAttn::Off => "off",
            FlashAttn::Auto => "auto",
        }
    }
}

/// The type of the KV cache's cells (`--cache-type-k`, `--cache-type-v`, as
/// llama.cpp's): f16, or quantized in blocks of 32 — q8_0 about halves the
/// cache (34 bytes a block against 64), q4_0 takes 18. A quantized V cache
/// needs flash attention (llama.cpp's rule); rbee's attention kernel takes
/// f16 caches only, llama.cpp's own kernel the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CacheType {
    #[default]
    #[serde(rename = "f16")]
    F16,
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "q4_0")]
    Q4_0,
}

impl CacheType {
    /// The flag's value: `f16`, `q8_0` or `q4_0`.
    pub fn parse(value: &str) -> Result<CacheType, String> {
        match value.to_ascii_lowercase().as_str() {
            "f16" => Ok(CacheType::F16),
            "q8_0" => Ok(CacheType::Q8_0),
            "q4_0" => Ok(CacheType::Q4_0),
            other => Err(format!("a cache type is f16, q8_0 or q4_0, not {other:?}")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CacheType::F16 => "f16",
            CacheType::Q8_0 => "q8_0",
            CacheType::Q4_0 => "q4_0",
        }
    }

    /// Bytes a block of 32 cells takes.
    pub fn bytes_per_32(self) -> u64 {
        match self {
            CacheType::F16 => 64,
            CacheType::Q8_0 => 34,
            CacheType::Q4_0 => 18,
        }
    }

    /// Whether a V cache of this type can work with flash attention `fa`
    /// (llama.cpp refuses a quantized V cache without it).
    pub fn check_v(self, fa: FlashAttn) -> Result<(), String> {
        match (self, fa) {
            (CacheType::F16, _) | (_, FlashAttn::On | FlashAttn::Auto) => Ok(()),
            (v, FlashAttn::Off) => Err(format!(
                "a {} V cache needs flash attention (llama.cpp's rule): drop --flash-attn off, \
                 or keep the V cache f16",
                v.as_str()
            )),
        }
    }
}

impl std::fmt::Display for CacheType {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a spawned worker finds the secret its report to the hive carries
/// (the environment: argv is visible to every user of the machine).
pub const WORKER_SECRET_ENV: &str = "RBEE_WORKER_SECRET";

/// Where a split worker finds the lending hives' tokens: one line per
/// `--remote`, in order (an empty line: none; absent: this worker's own).
pub const REMOTE_TOKENS_ENV: &str = "RBEE_REMOTE_TOKENS";

/// Milliseconds every chunk through a tunnel to a lending hive is held, each
/// way: a slower network for the benchmark (`make bench`), where `tc netem`
/// is not available.
pub const TUNNEL_DELAY_ENV: &str = "RBEE_TUNNEL_DELAY_MS";

/// Smaller contexts leave no room for a prompt and an answer.
pub const MIN_CTX_SIZE: u32 = 64;

/// Whether `slots` slots of `ctx` tokens each can work for a model trained
/// on `model_ctx` tokens (0: not known yet): the one rule for the worker's
/// flags, its engine and the hive's spawn requests. `Err` names the field
/// at fault (`slots` or `ctx_size`) and the limit.
pub fn check_slots(slots: u32, ctx: u32, model_ctx: u64) -> Result<(), (&'static str, String)> {
    if slots == 0 || slots > MAX_SLOTS {
        return Err((
            "slots",
            format!("slots must be between 1 and {MAX_SLOTS}, not {slots}"),
        ));
    }
    if ctx < MIN_CTX_SIZE {
        return Err((
            "ctx_size",
            format!("a context of {ctx} tokens per slot is less than the least of {MIN_CTX_SIZE}"),
        ));
    }
    if model_ctx > 0 && u64::from(ctx) > model_ctx {
        return Err((
            "ctx_size",
            format!(
                "a context of {ctx} tokens per slot is more than the model's training context of {model_ctx} tokens"
            ),
        ));
    }
    if slots
        .checked_mul(ctx)
        .is_none_or(|total| total > MAX_TOTAL_CTX)
    {
        return Err((
            "ctx_size",
            format!("{slots} slots of {ctx} tokens are more than the {MAX_TOTAL_CTX} tokens one llama.cpp context holds"),
        ));
    }
    Ok(())
}

/// llama.cpp keeps at most 256 sequences in one context.
const MAX_SLOTS: u32 = 256;

/// llama.cpp counts a context's tokens in an `int32_t`.
const MAX_TOTAL_CTX: u32 = i32::MAX as u32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_types_are_llama_cpps_names_and_a_quantized_v_needs_flash_attention() {
        assert_eq!(CacheType::parse("Q8_0"), Ok(CacheType::Q8_0));
        assert_eq!(CacheType::parse("f16"), Ok(CacheType::F16));
        assert!(CacheType::parse("q5_1")
            .unwrap_err()
            .contains("f16, q8_0 or q4_0"));
        assert_eq!(
            serde_json::to_string(&CacheType::Q4_0).unwrap(),
            r#""q4_0""#
        );
        assert_eq!(CacheType::F16.check_v(FlashAttn::Off), Ok(()));
        assert_eq!(CacheType::Q8_0.check_v(FlashAttn::Auto), Ok(()));
        let e = CacheType::Q4_0.check_v(FlashAttn::Off).unwrap_err();
        assert!(e.contains("needs flash attention"), "{e}");
    }

    #[test]
    fn slots_and_contexts_are_checked_against_real_limits() {
        assert_eq!(check_slots(4, 2048, 8192), Ok(()));
        assert_eq!(
            check_slots(4, 2048, 0),
            Ok(()),
            "the model's limit unknown yet"
        );
        let field = |slots, ctx, model| check_slots(slots, ctx, model).map_err(|(f, _)| f);
        assert_eq!(field(0, 2048, 8192), Err("slots"));
        assert_eq!(field(257, 2048, 8192), Err("slots"));
        assert_eq!(field(4, 63, 8192), Err("ctx_size"));
        // 2^31 tokens per slot: beyond SmolLM2's 8,192, and beyond what a
        // context holds for a model that claims more.
        let (_, message) = check_slots(2, 2_147_483_648, 8192).unwrap_err();
        assert!(
            message.contains("training context of 8192 tokens"),
            "{message}"
        );
        let (_, message) = check_slots(2, 2_147_483_648, u64::MAX).unwrap_err();
        assert!(
            message.contains("2147483647 tokens one llama.cpp context holds"),
            "{message}"
        );
        assert_eq!(
            field(256, 16_777_216, u64::MAX),
            Err("ctx_size"),
            "the product wraps u32"
        );
    }
}
