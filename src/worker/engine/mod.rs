//! The one thread that owns llama.cpp: backend, model, context and samplers.
//!
//! HTTP handlers never touch llama.cpp. They send a [`Submission`] down a
//! channel and read [`InferenceEvent`]s back. The thread loads the model,
//! then runs the continuous-batching loop: between two decode steps it takes
//! new requests, drops those whose client went away, admits queued requests
//! into free slots, and builds one batch from every active slot
//! ([`super::slots::plan_batch`]). Its only blocking wait is for work when
//! every slot is idle, so running streams never wait on the HTTP side.
//!
//! `handle` is the HTTP side's handle on the thread (`Engine`) and what
//! crosses the channel. `load` loads the model (with progress, and a split model's remote
//! devices); `prompt` turns a submission into a request (its prompt rendered
//! and checked, its sampler built); `embed` computes embeddings, a slice
//! between two decode steps.
//! This module and those three (with `rpc`, and `guard`, through which every
//! call that can throw a C++ exception goes) are the only code that touches
//! llama-cpp-2; `flash_attn` runs ggml's attention op against a reference (the
//! self-test `kernel` runs at start, and the tests of the CPU attention kernel
//! rbee adds to llama.cpp, vendor/ggml-cpu).

mod embed;
mod flash_attn;
mod guard;
mod handle;
pub mod kernel;
mod load;
mod prompt;

use super::cache::{Placement, PromptCache, Step, Token};
use super::slots::{plan_batch, Phase, PieceKind, Slots};
use super::template::Template;
use super::text::{Released, TokenText};
use crate::protocol::{
    ApiError, ErrorCode, InferenceEvent, LoadingEvent, StopReason, TokenLogprob,
};
use crate::protocol::{CacheType, FlashAttn};
use handle::Command;
pub use handle::{
    Admission, Described, Embedded, Engine, Load, Reservation, Submission, ToTokenize, Tokenized,
};
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::context::session::{LlamaStateSeqFlags, SeqState};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use load::{load_model, progress_event};
use prompt::{model_template, prepare};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Tokens per decode call: the room shared by generating slots and prompt chunks.
const BATCH_TOKENS: usize = 512;

/// How the engine is set up; fixed for the life of the worker.
#[derive(Debug, Clone)]
pub struct Config {
    pub model_path: PathBuf,
    pub slots: u32,
    /// Context of each slot, in tokens; `None` means min(4096, the model's training context).
    pub ctx_size: Option<u32>,
    pub threads: i32,
    pub gpu_layers: u32,
    pub main_gpu: i32,
    pub flash_attn: FlashAttn,
    /// The KV cache's K and V cell types.
    pub cache_types: (CacheType, CacheType),
    /// Requests that may wait for a slot before the worker answers 503.
    pub queue_size: u32,
    /// Host memory for conversations saved out of their slots, in bytes.
    pub cache_ram: usize,
    /// What the engine counts for `GET /metrics`.
    pub metrics: crate::metrics::WorkerMetrics,
    /// Lending hives' RPC servers (loopback tunnel endpoints) and the layers
    /// each takes, in order: the last layers of the model (DESIGN.md §12).
    pub remotes: Vec<(String, u32)>,
}

/// A request, from the moment its prompt is tokenized until it ends.
struct Request {
    submission: Box<Submission>,
    tokens: Vec<LlamaToken>,
    /// Where a failover's resumed tokens start in `tokens` (its length when none).
    resumed_from: usize,
    /// Prompt tokens already in the KV cache (from the prompt cache, then decoded).
    prompt_done: usize,
    /// Prompt tokens that came from the prompt cache.
    cached: usize,
    /// Generated tokens decoded into the sequence (the last sampled one is not, yet).
    fed: Vec<LlamaToken>,
    /// What the batch being decoded holds for it, counted once the decode succeeds.
    pending: Option<PieceKind>,
    /// The sampled token to feed next, once the prompt is read.
    next: Option<LlamaToken>,
    sampling: guard::Sampling,
    max_tokens: u32,
    generated: u32,
    /// Token events sent so far: the `i` of the next one.
    sent: u32,
    text: TokenText,
    /// Ids of generated tokens that went out with no text (they made a stop
    /// sequence): the `end` event carries them.
    textless: Vec<i32>,
    /// Log-probabilities of sampled tokens not yet sent (when asked for).
    logprobs: std::collections::VecDeque<TokenLogprob>,
    /// When it arrived, and when it got a slot (for the metrics).
    arrived: Instant,
    admitted: Option<Instant>,
    /// When the prompt was read and generation began.
    decode_started: Option<Instant>,
}

impl Request {
    fn phase(&self) -> Phase {
        if self.next.is_some() {
            Phase::Decode
        } else {
            Phase::Prefill {
                done: self.prompt_done,
                total: self.tokens.len(),
                stepwise_from: self.resumed_from,
            }
        }
    }

    /// Where `next`, the last sampled token, goes in this slot's sequence.
    fn position(&self) -> i32 {
        (self.prompt_done as u32 + self.generated) as i32 - 1
    }

    fn client_gone(&self) -> bool {
        self.submission.events.is_closed()
    }

    fn send(&self, event: InferenceEvent) {
        let _ = self.submission.events.send(event);
    }

    /// Sends released text with the ids of the tokens it is made of.
    fn send_text(&mut self, released: Released) {
        // The log-probabilities of exactly the tokens this text is made of.
        let n = released.ids.len().min(self.logprobs.len());
        let logprobs: Vec<TokenLogprob> = self.logprobs.drain(..n).collect();
        if released.text.is_empty() {
            self.textless.extend(released.ids);
            return;
        }
        let i = self.sent;
        self.sent += 1;
        self.send(InferenceEvent::Token {
            t: released.text,
            i,
            ids: released.ids,
            logprobs,
        });
    }

    /// What its sequence holds in the KV cache: the prompt as far as it was
    /// read, then every generated token that was decoded.
    fn held(&self) -> Vec<Token> {
        self.tokens[..self.prompt_done]
            .iter()
            .chain(&self.fed)
            .map(|t| t.0)
            .collect()
    }

    /// Sends what is held back (unless a stop sequence cut it) and the `end` event.
    fn finish(&mut self, reason: StopReason) {
        if reason != StopReason::StopSequence {
            let rest = self.text.finish();
            self.send_text(rest);
        }
        let decode_time_ms = self
            .decode_started
            .map_or(0, |t| t.elapsed().as_millis() as u64);
        let ids = std::mem::take(&mut self.textless);
        self.send(InferenceEvent::End {
            tokens_out: self.generated,
            decode_time_ms,
            stop_reason: reason,
            cached_tokens: self.cached as u32,
            ids,
            figures: None,
        });
    }
}

/// What the loop should do after taking commands.
enum Flow {
    Run,
    Stop,
}

/// How a decode call ended.
enum DecodeOutcome {
    Decoded,
    /// llama.cpp failed; the requests in the batch have been ended.
    Failed,
}

/// The batching loop's state: one context, its slots and its prompt cache.
struct Batcher<'m> {
    model: &'m LlamaModel,
    backend: &'m LlamaBackend,
    threads: i32,
    ctx: LlamaContext<'m>,
    /// The context embeddings are computed in, made at the first request
    /// for them, and how the model pools them.
    embedder: Option<(LlamaContext<'m>, embed::Pooling)>,
    /// Embeddings requests, first come first served, a slice per step.
    embeds: std::collections::VecDeque<embed::EmbedJob>,
    /// Tokens in the next slice of embeddings (it follows how long slices take).
    embed_slice: usize,
    batch: LlamaBatch<'static>,
    slots: Slots<Request>,
    cache: PromptCache<SeqState>,
    /// A restored state's buffer, for the next save to copy into: its pages
    /// are mapped already (18 MB took ~2 ms there, ~13 ms into fresh pages).
    spare: Option<SeqState>,
    /// The context one request may fill, in tokens.
    n_ctx_slot: u32,
    metrics: crate::metrics::WorkerMetrics,
    /// The model's own chat template, when it has one that compiles.
    template: Option<Template>,
}

/// The continuous-batching loop. Returns when told to shut down.
fn serve<'m>(
    config: &Config,
    backend: &'m LlamaBackend,
    model: &'m LlamaModel,
    commands: &std_mpsc::Receiver<Command>,
    load: &Load,
    progress: &watch::Sender<LoadingEvent>,
) -> Result<(), String> {
    let mut b = Batcher::new(config, backend, model)?;
    progress.send_replace(LoadingEvent::Ready);
    loop {
        if let Flow::Stop = b.take_commands(commands) {
            load.busy.store(0, Ordering::Relaxed);
            return Ok(());
        }
        b.drop_departed();
        b.admit();
        b.embed_step();
        b.publish(load);
        let Some(wants_logits) = b.build_batch()? else {
            continue;
        };
        if let DecodeOutcome::Decoded = b.decode() {
            b.sample(&wants_logits);
        }
        b.publish(load);
    }
}

impl<'m> Batcher<'m> {
    /// Creates the context: one sequence per slot, each with a KV stream of
    /// its own (see `super::cache` for why not one shared stream).
    fn new(
        config: &Config,
        backend: &'m LlamaBackend,
        model: &'m LlamaModel,
    ) -> Result<Batcher<'m>, String> {
        let n_ctx_slot = config
            .ctx_size
            .unwrap_or_else(|| model.n_ctx_train().min(4096));
        let n_slots = config.slots;
        crate::protocol::check_slots(n_slots, n_ctx_slot, u64::from(model.n_ctx_train()))
            .map_err(|(_, message)| message)?;
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx_slot * n_slots))
            .with_n_batch(BATCH_TOKENS as u32)
            .with_n_ubatch(BATCH_TOKENS as u32)
            .with_n_seq_max(n_slots)
            .with_n_threads(config.threads)
            .with_n_threads_batch(config.threads)
            .with_flash_attention_policy(match config.flash_attn {
                FlashAttn::On => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED,
                FlashAttn::Off => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED,
                FlashAttn::Auto => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_AUTO,
            })
            .with_type_k(kv_cache_type(config.cache_types.0))
            .with_type_v(kv_cache_type(config.cache_types.1));
        let ctx = model.new_context(backend, params).map_err(|e| {
            format!("cannot create a llama.cpp context of {n_slots}×{n_ctx_slot} tokens: {e}")
        })?;
        let (k, v) = config.cache_types;
        tracing::info!(
            "ready: {n_slots} slots of {n_ctx_slot} tokens (KV cache K {k}, V {v}), \
             prompt cache of {} MiB, {} threads",
            config.cache_ram >> 20,
            config.threads
        );
        Ok(Batcher {
            model,
            backend,
            threads: config.threads,
            ctx,
            embedder: None,
            embeds: std::collections::VecDeque::new(),
            embed_slice: 16,
            batch: LlamaBatch::new(BATCH_TOKENS, 1),
            slots: Slots::new(n_slots as usize),
            cache: PromptCache::new(n_slots as usize, config.cache_ram),
            spare: None,
            n_ctx_slot,
            metrics: config.metrics.clone(),
            template: model_template(model),
        })
    }

    fn describe(&mut self) -> Described {
        let n = self.slots.idle_slots().len() + self.slots.busy();
        let mut slots: Vec<Option<(u32, u32)>> = vec![None; n];
        for (i, r) in self.slots.busy_mut() {
            slots[i] = Some((r.tokens.len() as u32, r.generated));
        }
        let chat_template = self
            .model
            .chat_template(None)
            .ok()
            .and_then(|t| t.to_string().ok())
            .unwrap_or_default();
        Described {
            n_ctx: self.n_ctx_slot,
            n_vocab: self.model.n_vocab(),
            chat_template,
            slots,
        }
    }

    /// Step 1: new work. Blocks only when there is nothing to run.
    fn take_commands(&mut self, commands: &std_mpsc::Receiver<Command>) -> Flow {
        let mut next = if self.slots.is_idle() && self.embeds.is_empty() {
            match commands.recv() {
                Ok(c) => Some(c),
                Err(_) => return Flow::Stop,
            }
        } else {
            commands.try_recv().ok()
        };
        while let Some(command) = next {
            match command {
                Command::Submit(submission, admitted) => {
                    match prepare(
                        self.model,
                        self.template.as_ref(),
                        submission,
                        self.n_ctx_slot,
                    ) {
                        Ok(request) => {
                            let resumed = request.submission.request.resume_tokens.len();
                            let _ = admitted.send(Ok((request.tokens.len() - resumed) as u32));
                            self.slots.enqueue(request);
                        }
                        Err(rejection) => {
                            let _ = admitted.send(Err(rejection));
                        }
                    }
                }
                Command::Embed(texts, reply) => self.embed_request(&texts, reply),
                Command::Tokenize(what, reply) => {
                    let _ = reply.send(prompt::tokenize(self.model, self.template.as_ref(), what));
                }
                Command::Detokenize(ids, reply) => {
                    let _ = reply.send(prompt::detokenize(self.model, &ids));
                }
                Command::Describe(reply) => {
                    let _ = reply.send(self.describe());
                }
                Command::Shutdown => {
                    self.end_embeddings();
                    for r in self.slots.drain() {
                        r.send(InferenceEvent::Error {
                            code: ErrorCode::Cancelled,
                            message: "the worker is shutting down".into(),
                        });
                    }
                    return Flow::Stop;
                }
            }
            next = commands.try_recv().ok();
        }
        Flow::Run
    }

    /// Step 2: clients that went away give their place back now.
    fn drop_departed(&mut self) {
        self.slots.retain_queued(|r| !r.client_gone());
        let gone: Vec<usize> = self
            .slots
            .busy_mut()
            .filter(|(_, r)| r.client_gone())
            .map(|(i, _)| i)
            .collect();
        for i in gone {
            tracing::debug!("slot {i}: client went away");
            self.release(i);
        }
    }

    /// Step 3: queued requests take free slots, each the one whose KV cache
    /// (or a conversation saved to host memory) holds the longest prefix of
    /// its prompt; that prefix is not decoded again.
    fn admit(&mut self) {
        let cache = &mut self.cache;
        let mut placed = Vec::new();
        let filled = self.slots.admit(|r, free| {
            let prompt: Vec<Token> = r.tokens.iter().map(|t| t.0).collect();
            let reuse = r.submission.request.cache_prompt != Some(false);
            match cache.place(&prompt, reuse, free) {
                Some(placement) => {
                    let slot = placement.slot;
                    placed.push(placement);
                    slot
                }
                None => free[0],
            }
        });
        for (slot, placement) in filled.into_iter().zip(placed) {
            let reused = self.prepare_slot(slot, placement);
            if let Some(r) = self.slots.get_mut(slot) {
                r.prompt_done = reused;
                r.cached = reused;
                r.admitted = Some(Instant::now());
            }
        }
    }

    /// Carries out a placement's steps on llama.cpp; the prompt tokens now in
    /// the slot. A step that fails leaves the slot empty: nothing is reused.
    fn prepare_slot(&mut self, slot: usize, placement: Placement<SeqState>) -> usize {
        let seq = slot as i32;
        for step in placement.steps {
            let done = match step {
                Step::Save { entry } => {
                    let flags = LlamaStateSeqFlags::empty();
                    let state = match self.spare.take() {
                        Some(spare) => self.ctx.state_seq_get_reusing(seq, flags, spare),
                        None => self.ctx.state_seq_get(seq, flags),
                    };
                    let state = state
                        .map_err(|e| tracing::warn!("slot {slot}: cannot save its state: {e}"))
                        .ok()
                        .map(|state| {
                            let bytes = state.byte_len();
                            (state, bytes)
                        });
                    let dropped = self.cache.saved(entry, state);
                    if dropped > 0 {
                        tracing::debug!("prompt cache full: dropped {dropped} saved conversations");
                    }
                    true
                }
                Step::Restore { state } => {
                    let restored = self
                        .ctx
                        .state_seq_set(&state, seq)
                        .map_err(|e| tracing::warn!("slot {slot}: cannot restore a state: {e}"))
                        .is_ok();
                    // Its buffer takes the next save, if the budget has room for it.
                    if state.byte_len() <= self.cache.room() {
                        self.spare = Some(state);
                    }
                    restored
                }
                Step::Clear => self.clear(slot),
                Step::Truncate { from } => self
                    .ctx
                    .clear_kv_cache_seq(Some(slot as u32), Some(from as u32), None)
                    .is_ok_and(|removed| removed),
            };
            if !done {
                self.cache.forget(slot);
                self.clear(slot);
                return 0;
            }
        }
        placement.reused
    }

    /// Empties a slot's KV cache.
    fn clear(&mut self, slot: usize) -> bool {
        self.ctx
            .clear_kv_cache_seq(Some(slot as u32), None, None)
            .is_ok()
    }

    /// Tells the HTTP side how busy the engine is and what it remembers.
    fn publish(&mut self, load: &Load) {
        let (sequences, tokens) = self.cache.cached();
        let in_slots: usize = self
            .slots
            .busy_mut()
            .map(|(_, r)| r.prompt_done + r.fed.len())
            .sum();
        self.metrics.load(
            self.slots.busy(),
            self.slots.queued(),
            (in_slots + self.cache.resident()) as u64,
            u64::from(self.n_ctx_slot) * self.cache.slots() as u64,
        );
        load.busy.store(self.slots.busy() as u32, Ordering::Relaxed);
        load.cached_sequences
            .store(sequences as u32, Ordering::Relaxed);
        load.cached_tokens.store(tokens as u64, Ordering::Relaxed);
    }

    /// Step 4: one batch from every busy slot. `None` when there is nothing to
    /// decode; else the slots that want logits, with their batch index.
    fn build_batch(&mut self) -> Result<Option<Vec<(usize, i32)>>, String> {
        let phases: Vec<(usize, Phase)> =
            self.slots.busy_mut().map(|(i, r)| (i, r.phase())).collect();
        let plan = plan_batch(&phases, BATCH_TOKENS);
        if plan.is_empty() {
            return Ok(None);
        }
        self.batch.clear();
        let mut wants_logits = Vec::new();
        for piece in &plan {
            let Some(r) = self.slots.get_mut(piece.slot) else {
                continue;
            };
            let seq = [piece.slot as i32];
            let added = match piece.kind {
                PieceKind::Decode => {
                    wants_logits.push((piece.slot, self.batch.n_tokens()));
                    let token = r.next.unwrap_or(LlamaToken(0));
                    self.batch.add(token, r.position(), &seq, true)
                }
                PieceKind::Prompt { start, len, last } => (start..start + len).try_for_each(|p| {
                    let logits = last && p + 1 == start + len;
                    if logits {
                        wants_logits.push((piece.slot, self.batch.n_tokens()));
                    }
                    self.batch.add(r.tokens[p], p as i32, &seq, logits)
                }),
            };
            added.map_err(|e| format!("batch overflow, a bug: {e}"))?;
            // What this piece decodes counts once the decode succeeds.
            r.pending = Some(piece.kind);
        }
        Ok(Some(wants_logits))
    }

    /// Step 5: decode. A failure ends the requests in the batch, not the worker.
    fn decode(&mut self) -> DecodeOutcome {
        match guard::decode(&mut self.ctx, &self.batch) {
            Ok(()) => {
                self.metrics.decoded(self.slots.busy());
                for (_, r) in self.slots.busy_mut() {
                    match r.pending.take() {
                        Some(PieceKind::Prompt { len, .. }) => r.prompt_done += len,
                        Some(PieceKind::Decode) => r.fed.extend(r.next),
                        None => {}
                    }
                }
                DecodeOutcome::Decoded
            }
            Err(e) => {
                let in_batch: Vec<usize> = self
                    .slots
                    .busy_mut()
                    .filter_map(|(i, r)| r.pending.take().map(|_| i))
                    .collect();
                for slot in in_batch {
                    if let Some(r) = self.slots.get_mut(slot) {
                        r.send(InferenceEvent::Error {
                            code: ErrorCode::InferenceFailed,
                            message: format!("llama.cpp could not decode: {e}"),
                        });
                    }
                    // What the failed batch left in the slot is unknown.
                    self.slots.free(slot);
                    self.cache.release(slot, Vec::new());
                    self.clear(slot);
                }
                DecodeOutcome::Failed
            }
        }
    }

    /// Step 6: sample every slot that has logits, and send the text on.
    fn sample(&mut self, wants_logits: &[(usize, i32)]) {
        let vocab = self.model.vocab();
        for &(slot, idx) in wants_logits {
            let Some(r) = self.slots.get_mut(slot) else {
                continue;
            };
            let token = match guard::sample(&mut r.sampling, &self.ctx, idx) {
                Ok(token) => token,
                Err(e) => {
                    // A grammar no token can continue: this request ends, the others go on.
                    r.send(InferenceEvent::Error {
                        code: ErrorCode::InvalidRequest,
                        message: format!("sampling under the request's grammar failed: {e}"),
                    });
                    self.release(slot);
                    continue;
                }
            };
            if r.decode_started.is_none() {
                let reading = r.admitted.map_or(Duration::ZERO, |t| t.elapsed());
                let decoded = r.tokens.len() - r.cached;
                self.metrics.first_token(
                    decoded as u64,
                    r.cached as u64,
                    reading,
                    r.arrived.elapsed(),
                );
                r.decode_started = Some(Instant::now());
            }
            let ended = if vocab.is_eog(token) {
                r.finish(StopReason::Eos);
                true
            } else {
                self.metrics.predicted();
                if let Some(top) = r.submission.request.logprobs {
                    let logits = self.ctx.get_logits_ith(idx);
                    r.logprobs
                        .push_back(logprob(&vocab, logits, token, top as usize));
                }
                accept(
                    r,
                    &vocab.token_to_piece(token, false, None),
                    token,
                    self.n_ctx_slot,
                )
            };
            if ended {
                let decoding = r.decode_started.map_or(Duration::ZERO, |t| t.elapsed());
                self.metrics.generated(decoding);
                self.release(slot);
            }
        }
    }

    /// Frees a slot; what it holds stays in its KV cache for the next request.
    fn release(&mut self, slot: usize) {
        if let Some(r) = self.slots.free(slot) {
            self.cache.release(slot, r.held());
        }
    }
}

/// Takes one generated token's text into a request; true when its generation is over.
fn accept(r: &mut Request, piece: &[u8], token: LlamaToken, n_ctx_slot: u32) -> bool {
    r.generated += 1;
    let released = r.text.push(token.0, piece);
    let stopped = released.stopped;
    r.send_text(released);
    if stopped {
        r.finish(StopReason::StopSequence);
        return true;
    }
    // Feeding this token back would need a position past the slot's context.
    let context_full = r.position() + 1 >= n_ctx_slot as i32;
    if r.generated >= r.max_tokens || context_full {
        r.finish(StopReason::MaxTokens);
        return true;
    }
    r.next = Some(token);
    false
}

/// `token`'s log-probability under `logits` (a log-softmax over the whole
/// vocabulary), with the `top` likeliest tokens and theirs.
fn logprob(
    vocab: &llama_cpp_2::vocab::LlamaVocab<'_>,
    logits: &[f32],
    token: LlamaToken,
    top: usize,
) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln() + max;
    let entry = |t: LlamaToken| {
        let bytes = vocab.token_to_piece(t, true, None);
        TokenLogprob {
            id: t.0,
            token: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
            logprob: logits
                .get(t.0 as usize)
                .map_or(f32::NEG_INFINITY, |&l| l - log_sum),
            top: Vec::new(),
        }
    };
    let top = top.min(logits.len());
    let mut best: Vec<usize> = match top {
        0 => Vec::new(),
        _ => (0..logits.len()).collect(),
    };
    if top > 0 {
        best.select_nth_unstable_by(top - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
        best.truncate(top);
        best.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    }
    TokenLogprob {
        top: best
            .into_iter()
            .take(top)
            .map(|t| entry(LlamaToken(t as i32)))
            .collect(),
        ..entry(token)
    }
}

/// llama.cpp's own sampling defaults, which is what its users expect.
pub const DEFAULT_TEMPERATURE: f32 = 0.8;
pub const DEFAULT_TOP_K: i32 = 40;
pub const DEFAULT_TOP_P: f32 = 0.95;

/// llama.cpp's type for a KV cache's cells.
fn kv_cache_type(t: CacheType) -> KvCacheType {
    match t {
        CacheType::F16 => KvCacheType::F16,
        CacheType::Q8_0 => KvCacheType::Q8_0,
        CacheType::Q4_0 => KvCacheType::Q4_0,
    }
}
