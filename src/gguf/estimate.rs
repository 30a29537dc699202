//! What a model takes in memory, from its header: a whole worker's estimate
//! (weights, KV cache, compute) and each share of a split one.

use super::GgufInfo;
use crate::protocol::CacheType;
use serde::{Deserialize, Serialize};

/// Tokens llama.cpp decodes in one step (the worker's batch and micro-batch).
pub const BATCH_TOKENS: u64 = 512;

/// What a model takes in memory, in bytes, before it is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Estimate {
    /// The weights: the file (mapped), and the copy llama.cpp's CPU backend
    /// makes of the matrices it repacks (`GgufInfo::repacked_bytes`; for a
    /// Q4_0 model about the file again — `bench/memory.py` measured it) in a
    /// build without a GPU backend.
    pub weights: u64,
    /// The KV cache: layers × tokens (slots × context) × (K + V widths) × the
    /// bytes a cell takes (2 for f16; 34/32 for q8_0, 18/32 for q4_0).
    pub kv_cache: u64,
    /// llama.cpp's compute buffer and logits for one batch.
    pub compute: u64,
    /// Beyond llama.cpp's buffers: the runtime, threads, the HTTP side.
    pub margin: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.llama_cpp() + self.margin
    }

    /// What llama.cpp will report allocating: its buffers alone.
    pub fn llama_cpp(&self) -> u64 {
        self.weights + self.kv_cache + self.compute
    }
}

/// The fixed margin: the runtime, threads, the HTTP side.
const MARGIN: u64 = 48 << 20;

/// The memory a worker of this model with `slots` × `ctx_per_slot` tokens of
/// context, its KV cache's K and V cells of types `kv`, will take. Checked
/// against what llama.cpp reports allocating for SmolLM2 (see the test below
/// and ARCHITECTURE.md).
pub fn estimate(
    info: &GgufInfo,
    file_size: u64,
    slots: u64,
    ctx_per_slot: u64,
    kv: (CacheType, CacheType),
) -> Estimate {
    let per_token_32 = info.head_count_kv
        * (info.key_length * kv.0.bytes_per_32() + info.value_length * kv.1.bytes_per_32());
    let kv_cache = (info.layers * slots * ctx_per_slot * per_token_32).div_ceil(32);
    // llama.cpp's compute buffer for a batch is dominated by the logits
    // (vocab × batch) and a few hidden-width activations, all f32. For
    // SmolLM2 at 1×2048, 4×4096 and 8×1024 tokens it reported 104.8, 106.8
    // and 103.8 MiB; this gives 105.0.
    let logits = info.vocab_size * BATCH_TOKENS * 4;
    let activations = 8 * info.embedding_length * BATCH_TOKENS * 4;
    // A build with a GPU backend offloads every layer by default: nothing is
    // left on the CPU to repack (and a GPU's room is checked with this figure).
    let repacked = if crate::GPU_BACKEND {
        0
    } else {
        info.repacked_bytes
    };
    Estimate {
        weights: file_size + repacked,
        kv_cache,
        compute: logits + activations,
        margin: MARGIN,
    }
}

/// What the shares of a model split across machines take, in bytes
/// (DESIGN.md §12). llama.cpp keeps the input embeddings and the first layers
/// on the worker's own machine, gives the rest of the repeating layers to the
/// lending devices in order, and the output layer to the last of them; each
/// layer's KV cache lives with the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitCost {
    pub layers: u64,
    /// One repeating layer: its weights and its KV cache.
    pub per_layer: u64,
    /// The worker's machine without any layer: the rest of the weights and
    /// the compute buffer (logits included, as llama.cpp sizes it there).
    pub host: u64,
    /// The output layer, on the last lending device: its weights and logits.
    pub output: u64,
    /// Any lending device without a layer: its compute buffer and the RPC
    /// server around it.
    pub device: u64,
}

/// The costs of splitting this model with `slots` × `ctx_per_slot` tokens of
/// context; `None` when the header does not say which tensors are layers.
pub fn split_cost(
    info: &GgufInfo,
    file_size: u64,
    slots: u64,
    ctx_per_slot: u64,
    kv: (CacheType, CacheType),
) -> Option<SplitCost> {
    if info.layers == 0 || info.layer_bytes == 0 {
        return None;
    }
    let whole = estimate(info, file_size, slots, ctx_per_slot, kv);
    let activations = 8 * info.embedding_length * BATCH_TOKENS * 4;
    let logits = info.vocab_size * BATCH_TOKENS * 4;
    let per_layer = (info.layer_bytes + whole.kv_cache).div_ceil(info.layers);
    Some(SplitCost {
        layers: info.layers,
        per_layer,
        host: file_size.saturating_sub(info.layer_bytes) + whole.compute + whole.margin,
        output: info.output_bytes + logits,
        device: activations + whole.margin,
    })
}
