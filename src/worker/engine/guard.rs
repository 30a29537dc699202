//! The llama.cpp calls that can throw a C++ exception, made through
//! `guard.cpp`: each catches what was thrown and returns it as an error, so
//! one request's grammar or text ends that request, not the worker (an
//! exception unwinding into Rust aborts the process). The engine calls these
//! and never the throwing functions themselves.

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use std::ffi::{c_char, c_int, CStr, CString};

mod ffi {
    use super::{c_char, c_int};
    use llama_cpp_sys_2::{llama_batch, llama_context, llama_sampler, llama_token, llama_vocab};

    extern "C" {
        pub fn rbee_sample(
            grammar: *mut llama_sampler,
            chain: *mut llama_sampler,
            ctx: *mut llama_context,
            idx: i32,
            out: *mut llama_token,
            err: *mut c_char,
            cap: usize,
        ) -> c_int;
        pub fn rbee_decode(
            ctx: *mut llama_context,
            batch: llama_batch,
            ret: *mut i32,
            err: *mut c_char,
            cap: usize,
        ) -> c_int;
        pub fn rbee_sampler_accept(
            smpl: *mut llama_sampler,
            token: llama_token,
            err: *mut c_char,
            cap: usize,
        ) -> c_int;
        #[allow(clippy::too_many_arguments)]
        pub fn rbee_tokenize(
            vocab: *const llama_vocab,
            text: *const c_char,
            text_len: i32,
            tokens: *mut llama_token,
            n_tokens_max: i32,
            add_special: bool,
            parse_special: bool,
            n: *mut i32,
            err: *mut c_char,
            cap: usize,
        ) -> c_int;
        pub fn rbee_json_schema_to_grammar(
            schema: *const c_char,
            out: *mut *mut c_char,
            err: *mut c_char,
            cap: usize,
        ) -> c_int;
        pub fn rbee_free(p: *mut c_char);
        pub fn rbee_grammar_check(src: *const c_char, err: *mut c_char, cap: usize) -> c_int;
    }
}

/// Room for what an exception says; longer messages are cut.
const MESSAGE: usize = 512;

/// Runs one shim call with a buffer for its message: `Err(what was thrown)`
/// when it returned non-zero.
fn guarded(call: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
    let mut err = [0 as c_char; MESSAGE];
    if call(err.as_mut_ptr(), MESSAGE) == 0 {
        return Ok(());
    }
    // SAFETY: the shim wrote a NUL-terminated string within the buffer
    // (or left it zeroed).
    let said = unsafe { CStr::from_ptr(err.as_ptr()) };
    Err(said.to_string_lossy().into_owned())
}

/// How a request's tokens are chosen: its grammar, if it has one, apart
/// from the rest (penalties, top-k, top-p, temperature, the draw), so that a
/// grammar that allows nothing is found before the rest see only -inf.
pub struct Sampling {
    pub grammar: Option<LlamaSampler>,
    pub chain: LlamaSampler,
}

/// The next token at batch position `idx` (llama.cpp's `llama_sampler_sample`,
/// grammar first), or why there is none: what the grammar or a sampler threw,
/// or a grammar no token of the model can continue.
pub fn sample(s: &mut Sampling, ctx: &LlamaContext<'_>, idx: i32) -> Result<LlamaToken, String> {
    let mut token = 0;
    let grammar = s
        .grammar
        .as_mut()
        .map_or(std::ptr::null_mut(), LlamaSampler::as_raw);
    let chain = s.chain.as_raw();
    // SAFETY: the pointers come from live objects borrowed for the call; the
    // context's outputs are read only after it returns.
    let ctx = unsafe { ctx.as_raw() };
    guarded(|err, cap| unsafe {
        ffi::rbee_sample(grammar, chain, ctx, idx, &mut token, err, cap)
    })?;
    Ok(LlamaToken(token))
}

/// Feeds tokens generated elsewhere (a failover's answer so far) to the
/// grammar and the chain, stopping at the first one the grammar refuses.
pub fn accept_all(s: &mut Sampling, tokens: &[i32]) -> Result<(), String> {
    let samplers = s.grammar.iter_mut().chain(std::iter::once(&mut s.chain));
    for sampler in samplers {
        let smpl = sampler.as_raw();
        for &t in tokens {
            // SAFETY: the sampler is live and borrowed mutably for the call.
            guarded(|err, cap| unsafe { ffi::rbee_sampler_accept(smpl, t, err, cap) })?;
        }
    }
    Ok(())
}

/// `LlamaContext::decode`: `Err` with llama.cpp's return code, or what it threw.
pub fn decode(ctx: &mut LlamaContext<'_>, batch: &LlamaBatch<'_>) -> Result<(), String> {
    let mut ret = 0;
    // SAFETY: the context is borrowed mutably for the call; the batch's
    // arrays live as long as `batch`, which outlives it.
    let raw = unsafe { ctx.as_raw() };
    let b = batch.as_raw();
    guarded(|err, cap| unsafe { ffi::rbee_decode(raw, b, &mut ret, err, cap) })?;
    match ret {
        0 => Ok(()),
        1 => Err("no room in the KV cache for this batch".into()),
        2 => Err("aborted".into()),
        code => Err(format!("llama_decode returned {code}")),
    }
}

/// The model's tokens for `text`, with `add_special` a BOS first if the model
/// wants one; `parse_special`: special tokens written out in the text are those tokens.
pub fn tokenize(
    model: &LlamaModel,
    text: &str,
    add_special: bool,
    parse_special: bool,
) -> Result<Vec<LlamaToken>, String> {
    let len = i32::try_from(text.len()).map_err(|_| {
        format!(
            "a text of {} bytes is more than llama.cpp takes",
            text.len()
        )
    })?;
    let vocab = model.vocab();
    let mut tokens: Vec<i32> = vec![0; text.len() / 2 + 8];
    for _ in 0..2 {
        let mut n = 0;
        let room = i32::try_from(tokens.len()).unwrap_or(i32::MAX);
        // SAFETY: `text` is `len` bytes, `tokens` has room for `room` tokens.
        guarded(|err, cap| unsafe {
            ffi::rbee_tokenize(
                vocab.as_raw(),
                text.as_ptr().cast(),
                len,
                tokens.as_mut_ptr(),
                room,
                add_special,
                parse_special,
                &mut n,
                err,
                cap,
            )
        })?;
        if n >= 0 {
            tokens.truncate(n as usize);
            return Ok(tokens.into_iter().map(LlamaToken).collect());
        }
        // Negative: the number of tokens it needs.
        tokens.resize(n.unsigned_abs() as usize, 0);
    }
    Err("llama.cpp's tokenizer asked for more room twice".into())
}

/// llama.cpp's JSON-schema converter: the schema's GBNF grammar, or what the
/// converter said was wrong.
pub fn json_schema_to_grammar(schema: &str) -> Result<String, String> {
    let schema = CString::new(schema).map_err(|_| "the schema holds a NUL byte".to_string())?;
    let mut out: *mut c_char = std::ptr::null_mut();
    // SAFETY: `schema` is NUL-terminated; `out` receives a malloc'd string.
    guarded(|err, cap| unsafe {
        ffi::rbee_json_schema_to_grammar(schema.as_ptr(), &mut out, err, cap)
    })?;
    if out.is_null() {
        return Err("the converter returned no grammar".into());
    }
    // SAFETY: on success `out` is a NUL-terminated string from malloc, freed here once.
    let grammar = unsafe { CStr::from_ptr(out) }
        .to_string_lossy()
        .into_owned();
    unsafe { ffi::rbee_free(out) };
    Ok(grammar)
}

/// Whether llama.cpp's GBNF parser takes `gbnf`, and if not, why (its
/// sampler constructor only logs that). Run after [`crate::gbnf::check`],
/// which refuses what would make the parser allocate without bound.
pub fn grammar_parses(gbnf: &str) -> Result<(), String> {
    let src = CString::new(gbnf).map_err(|_| "the grammar holds a NUL byte".to_string())?;
    // SAFETY: `src` is NUL-terminated.
    guarded(|err, cap| unsafe { ffi::rbee_grammar_check(src.as_ptr(), err, cap) })
}
