//! Embeddings (`POST /v1/embeddings`), computed by the engine thread
//! between two decode steps on a context of their own.

use super::{Batcher, Embedded};
use crate::protocol::{ApiError, ErrorCode};
use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::llama_batch::LlamaBatch;
use std::num::NonZeroU32;

/// The longest text an embedding is made of, in tokens (less if a slot is smaller).
const EMBED_CONTEXT: u32 = 2048;

impl Batcher<'_> {
    /// Embeds each text on the embeddings context (made now if this is the
    /// first request): the pooled, L2-normalized vector, mean pooling when the
    /// model declares no pooling of its own.
    pub(super) fn embed(&mut self, texts: &[String]) -> Embedded {
        let n_ctx = self.n_ctx_slot.min(EMBED_CONTEXT);
        let failed = |m: String| ApiError::new(ErrorCode::InferenceFailed, m);
        if self.embedder.is_none() {
            let arch = self
                .model
                .meta_val_str("general.architecture")
                .unwrap_or_default();
            let declared = self
                .model
                .meta_val_str(&format!("{arch}.pooling_type"))
                .is_ok();
            let pooling = if declared {
                LlamaPoolingType::Unspecified
            } else {
                LlamaPoolingType::Mean
            };
            let params = LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new(n_ctx))
                .with_n_batch(n_ctx)
                .with_n_ubatch(n_ctx)
                .with_embeddings(true)
                .with_pooling_type(pooling)
                .with_n_threads(self.threads)
                .with_n_threads_batch(self.threads);
            let ctx = self
                .model
                .new_context(self.backend, params)
                .map_err(|e| failed(format!("cannot create an embeddings context: {e}")))?;
            self.embedder = Some(ctx);
        }
        let Some(ctx) = self.embedder.as_mut() else {
            return Err(failed("no embeddings context".into()));
        };
        let mut vectors = Vec::with_capacity(texts.len());
        let mut total = 0u32;
        for (i, text) in texts.iter().enumerate() {
            let tokens = super::guard::tokenize(self.model, text, false).map_err(|e| {
                ApiError::invalid("input", format!("input {i} cannot be tokenized: {e}"))
            })?;
            if tokens.len() > n_ctx as usize {
                return Err(ApiError::new(
                    ErrorCode::ContextOverflow,
                    format!(
                        "input {i} is {} tokens; embeddings take at most {n_ctx}",
                        tokens.len()
                    ),
                ));
            }
            ctx.clear_kv_cache();
            let mut batch = LlamaBatch::new(tokens.len().max(1), 1);
            for (pos, t) in tokens.iter().enumerate() {
                batch
                    .add(*t, pos as i32, &[0], true)
                    .map_err(|e| failed(e.to_string()))?;
            }
            ctx.decode(&mut batch)
                .map_err(|e| failed(format!("llama.cpp could not embed input {i}: {e}")))?;
            let v = ctx
                .embeddings_seq_ith(0)
                .map_err(|e| failed(format!("no embedding for input {i}: {e}")))?;
            let norm = v
                .iter()
                .map(|x| x * x)
                .sum::<f32>()
                .sqrt()
                .max(f32::MIN_POSITIVE);
            vectors.push(v.iter().map(|x| x / norm).collect());
            total += tokens.len() as u32;
        }
        Ok((vectors, total))
    }
}
