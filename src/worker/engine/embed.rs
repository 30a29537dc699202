//! Embeddings (`POST /v1/embeddings`), computed by the engine thread on a
//! context of their own, in slices between two decode steps: a request of
//! many long inputs shares the engine with the answers being generated
//! instead of holding it, ends when its client leaves or the worker stops,
//! and is refused beyond [`MAX_REQUEST_TOKENS`].

use super::{guard, Batcher, Embedded};
use crate::protocol::{ApiError, ErrorCode};
use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use std::num::NonZeroU32;
use tokio::sync::oneshot;

/// The longest text an embedding is made of, in tokens (less if a slot is smaller).
const EMBED_CONTEXT: u32 = 2048;
/// How long one slice of embeddings may hold the engine: a chat turn that
/// arrives meanwhile waits at most about this long for its first token's step.
const SLICE_TIME: std::time::Duration = std::time::Duration::from_millis(25);
/// The fewest and most tokens in a slice; between them the slice follows
/// [`SLICE_TIME`] (SmolLM2-135M on 2 cores: ~8 tokens at depth 2,000).
const SLICE_FEWEST: usize = 4;
const SLICE_MOST: usize = 512;
/// The most tokens one request may ask to embed, all inputs together
/// (16 inputs of 2,048: a larger job is the client's to split).
pub const MAX_REQUEST_TOKENS: usize = 32_768;

/// An embeddings request in progress.
pub(super) struct EmbedJob {
    inputs: Vec<Vec<LlamaToken>>,
    /// The input being embedded, and how many of its tokens are decoded.
    input: usize,
    done: usize,
    /// The sum of the current input's token embeddings so far (mean pooling).
    sum: Vec<f32>,
    vectors: Vec<Vec<f32>>,
    reply: oneshot::Sender<Embedded>,
}

/// How the model's embeddings are pooled.
pub(super) enum Pooling {
    /// The model declares its own (an embedding model, often not causal):
    /// each input is read whole, in one step, and pooled by llama.cpp.
    Declared,
    /// None declared (a causal LLM): mean pooling over its tokens, computed
    /// here from per-token embeddings, so an input can be read in slices.
    Mean,
}

impl Batcher<'_> {
    /// Takes an embeddings request: its inputs tokenized and checked, or the
    /// reason it is refused sent at once.
    pub(super) fn embed_request(&mut self, texts: &[String], reply: oneshot::Sender<Embedded>) {
        match self.tokenize_inputs(texts) {
            Ok(inputs) => self.embeds.push_back(EmbedJob {
                inputs,
                input: 0,
                done: 0,
                sum: Vec::new(),
                vectors: Vec::with_capacity(texts.len()),
                reply,
            }),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    fn tokenize_inputs(&self, texts: &[String]) -> Result<Vec<Vec<LlamaToken>>, ApiError> {
        let n_ctx = self.n_ctx_slot.min(EMBED_CONTEXT) as usize;
        let mut total = 0;
        let mut inputs = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let tokens = guard::tokenize(self.model, text, true, false).map_err(|e| {
                ApiError::invalid("input", format!("input {i} cannot be tokenized: {e}"))
            })?;
            if tokens.len() > n_ctx {
                return Err(ApiError::new(
                    ErrorCode::ContextOverflow,
                    format!(
                        "input {i} is {} tokens; embeddings take at most {n_ctx}",
                        tokens.len()
                    ),
                ));
            }
            total += tokens.len();
            if total > MAX_REQUEST_TOKENS {
                return Err(ApiError::invalid(
                    "input",
                    format!(
                        "the inputs are more than {MAX_REQUEST_TOKENS} tokens together; send \
                         them in several requests"
                    ),
                ));
            }
            inputs.push(tokens);
        }
        Ok(inputs)
    }

    /// Ends every embeddings request: the worker is stopping.
    pub(super) fn end_embeddings(&mut self) {
        for job in self.embeds.drain(..) {
            let _ = job.reply.send(Err(ApiError::new(
                ErrorCode::ShuttingDown,
                "the worker is shutting down",
            )));
        }
    }

    /// One slice of the first embeddings request (one step of the loop):
    /// about [`SLICE_TIME`]'s worth of tokens of its current input, or the whole input when
    /// the model pools by itself. Answers the request when its last input is done.
    pub(super) fn embed_step(&mut self) {
        // A client that left takes its request with it.
        self.embeds.retain(|job| !job.reply.is_closed());
        if self.embeds.is_empty() {
            return;
        }
        let failed = |m: String| ApiError::new(ErrorCode::InferenceFailed, m);
        let outcome = match self.make_embedder() {
            Ok(()) => self.embed_slice().map_err(failed),
            Err(e) => Err(failed(e)),
        };
        match outcome {
            Ok(false) => {}
            Ok(true) => {
                if let Some(job) = self.embeds.pop_front() {
                    let tokens = job.inputs.iter().map(Vec::len).sum::<usize>() as u32;
                    let _ = job.reply.send(Ok((job.vectors, tokens)));
                }
            }
            Err(e) => {
                if let Some(job) = self.embeds.pop_front() {
                    let _ = job.reply.send(Err(e));
                }
            }
        }
    }

    /// Makes the embeddings context, and learns how the model pools, at the first request.
    fn make_embedder(&mut self) -> Result<(), String> {
        if self.embedder.is_some() {
            return Ok(());
        }
        let arch = self
            .model
            .meta_val_str("general.architecture")
            .unwrap_or_default();
        let declared = self
            .model
            .meta_val_str(&format!("{arch}.pooling_type"))
            .is_ok();
        let n_ctx = self.n_ctx_slot.min(EMBED_CONTEXT);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_batch(n_ctx)
            .with_n_ubatch(n_ctx)
            .with_embeddings(true)
            .with_pooling_type(if declared {
                LlamaPoolingType::Unspecified
            } else {
                LlamaPoolingType::None
            })
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads);
        let ctx = self
            .model
            .new_context(self.backend, params)
            .map_err(|e| format!("cannot create an embeddings context: {e}"))?;
        let pooling = if declared {
            Pooling::Declared
        } else {
            Pooling::Mean
        };
        self.embedder = Some((ctx, pooling));
        Ok(())
    }

    /// Decodes the next slice of the first request; true when it is complete.
    fn embed_slice(&mut self) -> Result<bool, String> {
        let (Some((ctx, pooling)), Some(job)) = (self.embedder.as_mut(), self.embeds.front_mut())
        else {
            return Ok(false);
        };
        let i = job.input;
        let tokens = &job.inputs[i];
        if job.done == 0 {
            ctx.clear_kv_cache();
            job.sum.clear();
        }
        let end = match pooling {
            Pooling::Declared => tokens.len(),
            Pooling::Mean => (job.done + self.embed_slice).min(tokens.len()),
        };
        let started = std::time::Instant::now();
        let mut batch = LlamaBatch::new((end - job.done).max(1), 1);
        for (pos, t) in tokens.iter().enumerate().take(end).skip(job.done) {
            batch
                .add(*t, pos as i32, &[0], true)
                .map_err(|e| e.to_string())?;
        }
        guard::decode(ctx, &batch)
            .map_err(|e| format!("llama.cpp could not embed input {i}: {e}"))?;
        match pooling {
            Pooling::Declared => {
                let v = ctx
                    .embeddings_seq_ith(0)
                    .map_err(|e| format!("no embedding for input {i}: {e}"))?;
                job.sum = v.to_vec();
            }
            Pooling::Mean => add_token_embeddings(ctx, end - job.done, &mut job.sum)
                .map_err(|e| format!("no embedding for input {i}: {e}"))?,
        }
        // The next slice as long as this one took short or long.
        let took = started.elapsed();
        if took < SLICE_TIME / 2 {
            self.embed_slice = (self.embed_slice * 2).min(SLICE_MOST);
        } else if took > SLICE_TIME * 2 {
            self.embed_slice = (self.embed_slice / 2).max(SLICE_FEWEST);
        }
        job.done = end;
        if job.done < tokens.len() {
            return Ok(false);
        }
        let n = match pooling {
            Pooling::Declared => 1.0,
            Pooling::Mean => tokens.len().max(1) as f32,
        };
        job.vectors.push(normalized(&job.sum, n));
        job.input += 1;
        job.done = 0;
        Ok(job.input == job.inputs.len())
    }
}

/// Adds the embeddings of the batch's `n` tokens to `sum`.
fn add_token_embeddings(
    ctx: &LlamaContext<'_>,
    n: usize,
    sum: &mut Vec<f32>,
) -> Result<(), String> {
    for k in 0..n {
        let v = ctx.embeddings_ith(k as i32).map_err(|e| e.to_string())?;
        if sum.is_empty() {
            sum.resize(v.len(), 0.0);
        }
        for (s, x) in sum.iter_mut().zip(v) {
            *s += x;
        }
    }
    Ok(())
}

/// `sum / n`, L2-normalized (the scale cancels: the vector's direction is the answer).
fn normalized(sum: &[f32], n: f32) -> Vec<f32> {
    let mean: Vec<f32> = sum.iter().map(|x| x / n).collect();
    let norm = mean
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    mean.iter().map(|x| x / norm).collect()
}
