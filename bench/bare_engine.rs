//! The bare engine: llama-cpp-2 (the same llama.cpp as rbee) driven in a plain
//! single-sequence decode loop, with no HTTP, no channels and no batching
//! logic. It is the ceiling for one stream, used by `make bench`.
//!
//! `bare_engine MODEL PROMPT N_TOKENS THREADS CTX` prints one JSON line:
//! time to first token and decode tokens/s, model loading excluded.

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use std::num::NonZeroU32;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        return Err("usage: bare_engine MODEL PROMPT N_TOKENS THREADS CTX".into());
    }
    let n_tokens: usize = args[3].parse()?;
    let threads: i32 = args[4].parse()?;
    let ctx_size: u32 = args[5].parse()?;
    let mut backend = LlamaBackend::init()?;
    backend.void_logs();
    let model = LlamaModel::load_from_file(&backend, &args[1], &LlamaModelParams::default())?;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(ctx_size))
        .with_n_batch(512)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = model.new_context(&backend, params)?;
    let prompt = model.vocab().tokenize(args[2].as_bytes(), true, true);
    let mut batch = LlamaBatch::new(512, 1);
    let mut sampler = LlamaSampler::greedy();

    let start = Instant::now();
    for (i, t) in prompt.iter().enumerate() {
        batch.add(*t, i as i32, &[0], i + 1 == prompt.len())?;
    }
    ctx.decode(&mut batch)?;
    let mut token = sampler.sample(&ctx, batch.n_tokens() - 1);
    let first = start.elapsed();
    let mut produced = 1;
    let mut pos = prompt.len() as i32;
    while produced < n_tokens {
        batch.clear();
        batch.add(token, pos, &[0], true)?;
        ctx.decode(&mut batch)?;
        token = sampler.sample(&ctx, 0);
        pos += 1;
        produced += 1;
    }
    let decode = start.elapsed() - first;
    println!(
        "{{\"ttft_ms\":{:.2},\"decode_tps\":{:.2},\"tokens\":{produced}}}",
        first.as_secs_f64() * 1000.0,
        (produced - 1) as f64 / decode.as_secs_f64()
    );
    Ok(())
}
