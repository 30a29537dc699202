//! What a request becomes before it is decoded: its prompt (the chat
//! template rendered, the failover's tokens appended) checked against the
//! slot's context, and its sampler (the grammar a constraint asks for first).

use super::{
    guard, Request, Submission, Template, DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P,
};
use crate::protocol::{
    ApiError, ChatMessage, Constraint, ErrorCode, InferenceRequest, SamplingParams,
};
use crate::worker::text::TokenText;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::token::LlamaToken;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Tokenizes a request and checks it against the slot's context.
pub(super) fn prepare(
    model: &LlamaModel,
    template: Option<&Template>,
    submission: Box<Submission>,
    n_ctx_slot: u32,
) -> Result<Request, ApiError> {
    let request = &submission.request;
    let rendered;
    let prompt = match &request.messages {
        Some(messages) => {
            rendered = render_chat(model, template, messages, &request.tools)?;
            &rendered
        }
        None => &request.prompt,
    };
    let mut tokens = guard::tokenize(model, prompt, true, true)
        .map_err(|e| ApiError::invalid("prompt", format!("the prompt cannot be tokenized: {e}")))?;
    if tokens.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt has no tokens"));
    }
    let n_vocab = model.n_vocab();
    check_token_ids(request, n_vocab)?;
    let (n_ctx_slot, whose) = match request.context_limit {
        Some(n) if n < n_ctx_slot => (n, "the request's num_ctx"),
        _ => (n_ctx_slot, "this worker's context"),
    };
    let resumed_from = tokens.len();
    tokens.extend(request.resume_tokens.iter().map(|&t| LlamaToken(t)));
    if tokens.len() >= n_ctx_slot as usize {
        return Err(ApiError::new(
            ErrorCode::ContextOverflow,
            format!(
                "the prompt is {} tokens, and {whose} is {n_ctx_slot} tokens per \
                 request, with at least one left to generate",
                tokens.len()
            ),
        ));
    }
    let room = n_ctx_slot - tokens.len() as u32;
    let max_tokens = request
        .sampling
        .max_tokens
        .map_or(room, |n| n.clamp(1, i64::from(room)) as u32);
    let mut sampling = guard::Sampling {
        grammar: grammar_for(model, request.constraint.as_ref())?,
        chain: sampler_for(&request.sampling, n_vocab, n_ctx_slot),
    };
    // A failover continues an answer the grammar has seen part of.
    guard::accept_all(&mut sampling, &request.resume_tokens).map_err(|e| {
        ApiError::invalid(
            "resume_tokens",
            format!("the answer so far does not fit the request's grammar: {e}"),
        )
    })?;
    Ok(Request {
        sampling,
        text: TokenText::new(request.sampling.stop.clone()),
        textless: Vec::new(),
        logprobs: Default::default(),
        submission,
        tokens,
        resumed_from,
        prompt_done: 0,
        cached: 0,
        fed: Vec::new(),
        pending: None,
        next: None,
        max_tokens,
        generated: 0,
        sent: 0,
        arrived: Instant::now(),
        admitted: None,
        decode_started: None,
    })
}

/// Token ids a request names are in the model's vocabulary: a failover's
/// answer so far (as the worker that was lost generated it) and `logit_bias`.
fn check_token_ids(request: &InferenceRequest, n_vocab: i32) -> Result<(), ApiError> {
    let outside = |what: &str, bad: i32| {
        ApiError::invalid(
            what,
            format!("token {bad} is not in this model's vocabulary of {n_vocab}"),
        )
    };
    if let Some(&bad) = request
        .resume_tokens
        .iter()
        .find(|&&t| t < 0 || t >= n_vocab)
    {
        return Err(outside("resume_tokens", bad));
    }
    if let Some(&(bad, _)) = request
        .sampling
        .logit_bias
        .iter()
        .find(|&&(t, _)| t >= n_vocab)
    {
        return Err(outside("logit_bias", bad));
    }
    Ok(())
}

/// `/tokenize`: a text's tokens, or the prompt chat messages make, each
/// with its bytes.
pub(super) fn tokenize(
    model: &LlamaModel,
    template: Option<&Template>,
    what: super::ToTokenize,
) -> Result<super::Tokenized, ApiError> {
    let (text, add_special, parse_special) = match what {
        super::ToTokenize::Text {
            content,
            add_special,
            parse_special,
        } => (content, add_special, parse_special),
        super::ToTokenize::Chat { messages, tools } => {
            crate::protocol::check_prompt("", Some(&messages))?;
            (render_chat(model, template, &messages, &tools)?, true, true)
        }
    };
    let tokens = guard::tokenize(model, &text, add_special, parse_special)
        .map_err(|e| ApiError::invalid("content", format!("the text cannot be tokenized: {e}")))?;
    let vocab = model.vocab();
    Ok(super::Tokenized {
        pieces: tokens
            .iter()
            .map(|&t| vocab.token_to_piece(t, true, None))
            .collect(),
        ids: tokens.into_iter().map(|t| t.0).collect(),
    })
}

/// `/detokenize`: the bytes of a run of tokens, each checked to be in the vocabulary.
pub(super) fn detokenize(model: &LlamaModel, ids: &[i32]) -> Result<Vec<u8>, ApiError> {
    let n_vocab = model.n_vocab();
    if let Some(bad) = ids.iter().find(|&&t| t < 0 || t >= n_vocab) {
        return Err(ApiError::invalid(
            "tokens",
            format!("token {bad} is not in this model's vocabulary of {n_vocab}"),
        ));
    }
    let tokens: Vec<LlamaToken> = ids.iter().map(|&t| LlamaToken(t)).collect();
    Ok(model.vocab().detokenize(&tokens, false, true))
}

/// The model's chat template (`tokenizer.chat_template`), compiled; `None`
/// (said once in the log) when it has none or it does not compile.
pub(super) fn model_template(model: &LlamaModel) -> Option<Template> {
    let source = model.chat_template(None).ok()?.to_string().ok()?;
    let vocab = model.vocab();
    let text = |t: LlamaToken| {
        vocab
            .text(t)
            .map(|c| c.to_string_lossy().to_string())
            .unwrap_or_default()
    };
    match Template::new(
        &source,
        &text(vocab.bos()),
        &text(vocab.eos()),
        vocab.should_add_bos(),
    ) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!("{e}; chat prompts use llama.cpp's built-in formats");
            None
        }
    }
}

/// The prompt for chat messages: the model's own template, else llama.cpp's
/// built-in matcher, else ChatML (`<|im_start|>role\ncontent<|im_end|>`);
/// a template that fails is said once in the log.
fn render_chat(
    model: &LlamaModel,
    template: Option<&Template>,
    messages: &[ChatMessage],
    tools: &[crate::protocol::Tool],
) -> Result<String, ApiError> {
    static FAILURE_SAID: AtomicBool = AtomicBool::new(false);
    if let Some(t) = template {
        match t.render(messages, tools) {
            Ok(prompt) => return Ok(prompt),
            Err(e) if !FAILURE_SAID.swap(true, Ordering::Relaxed) => {
                tracing::warn!("{e}; falling back to llama.cpp's built-in chat formats");
            }
            Err(_) => {}
        }
    }
    let invalid = |message: String| ApiError::invalid("messages", message);
    let chat: Vec<LlamaChatMessage> = crate::worker::template::plain(messages, tools)
        .into_iter()
        .map(|m| LlamaChatMessage::new(m.role, m.content))
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(format!("a message cannot be used: {e}")))?;
    let chatml = || LlamaChatTemplate::new("chatml").map_err(|e| e.to_string());
    let builtin = model
        .chat_template(None)
        .map_err(|e| e.to_string())
        .or_else(|_| chatml());
    builtin
        .and_then(|t| {
            model
                .apply_chat_template(&t, &chat, true)
                .map_err(|e| e.to_string())
        })
        .or_else(|_| {
            chatml().and_then(|t| {
                model
                    .apply_chat_template(&t, &chat, true)
                    .map_err(|e| e.to_string())
            })
        })
        .map_err(|e| invalid(format!("cannot apply the chat template: {e}")))
}

/// The grammar sampler a constraint asks for: the client's GBNF, or llama.cpp's
/// JSON-schema converter's. Every grammar passes [`crate::gbnf::check`] and
/// llama.cpp's parser (through the exception boundary) before the sampler is
/// made, so a 400 says what is wrong with it.
fn grammar_for(
    model: &LlamaModel,
    constraint: Option<&Constraint>,
) -> Result<Option<LlamaSampler>, ApiError> {
    let Some(constraint) = constraint else {
        return Ok(None);
    };
    let param = match constraint {
        Constraint::Grammar { .. } => "grammar",
        Constraint::ToolCalls { .. } => "tools",
        _ => "response_format",
    };
    let failed = |e: String| ApiError::invalid(param, format!("cannot build a grammar: {e}"));
    let convert = |schema: &str| {
        guard::json_schema_to_grammar(schema).map_err(|e| failed(e.replace('\n', " ")))
    };
    let gbnf = match constraint {
        Constraint::JsonObject => convert(r#"{"type":"object"}"#)?,
        Constraint::JsonSchema { schema } => convert(&schema.to_string())?,
        Constraint::ToolCalls { tools, parallel } => {
            tool_call_grammar(&convert(&tool_call_schema(tools))?, *parallel)
        }
        Constraint::Grammar { gbnf } => gbnf.clone(),
    };
    crate::gbnf::check(&gbnf).map_err(&failed)?;
    guard::grammar_parses(&gbnf).map_err(|e| failed(shorten(&e)))?;
    LlamaSampler::grammar(model, &gbnf, "root")
        .map(Some)
        .map_err(|_| failed("llama.cpp refused it (a rule that is left-recursive?)".into()))
}

/// llama.cpp's parser quotes the rest of the grammar after the place it
/// stopped: a line of it is enough.
fn shorten(message: &str) -> String {
    let line = message.lines().next().unwrap_or_default();
    match line.char_indices().nth(120) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_string(),
    }
}

/// One call of any of `tools`: `{"name": …, "arguments": …}`, name first.
fn tool_call_schema(tools: &[crate::protocol::Tool]) -> String {
    let calls: Vec<String> = tools
        .iter()
        .map(|t| {
            let arguments = t
                .function
                .parameters
                .clone()
                .unwrap_or_else(|| serde_json::json!({"type": "object"}));
            format!(
                r#"{{"type":"object","properties":{{"name":{{"const":{}}},"arguments":{arguments}}},"required":["name","arguments"]}}"#,
                serde_json::Value::String(t.function.name.clone())
            )
        })
        .collect();
    format!(r#"{{"anyOf":[{}]}}"#, calls.join(","))
}

/// The converter's grammar for one call, its root renamed, inside
/// `<tool_call>` tags, once or (`parallel`) as many times as the model likes.
fn tool_call_grammar(call: &str, parallel: bool) -> String {
    let renamed: Vec<String> = call
        .lines()
        .map(|l| match l.strip_prefix("root ::=") {
            Some(rest) => format!("tool-call-json ::={rest}"),
            None => l.to_string(),
        })
        .collect();
    let one = r#""<tool_call>\n" tool-call-json "\n</tool_call>""#;
    let root = if parallel {
        format!("root ::= {one} (\"\\n\" {one})*")
    } else {
        format!("root ::= {one}")
    };
    format!("{root}\n{}\n", renamed.join("\n"))
}

/// llama.cpp's order: logit biases, the penalties (llama.cpp's repetition
/// penalty, OpenAI's presence and frequency), then greedy at temperature 0
/// (deterministic); else top-k, typical, top-p, min-p, temperature and a seeded
/// draw, or temperature and Mirostat. (A grammar goes before all of them: see
/// `guard::sample`.) Token ids were checked against the vocabulary.
fn sampler_for(request: &SamplingParams, n_vocab: i32, n_ctx: u32) -> LlamaSampler {
    let mut chain: Vec<LlamaSampler> = Vec::new();
    if !request.logit_bias.is_empty() {
        let biases: Vec<LlamaLogitBias> = request
            .logit_bias
            .iter()
            .map(|&(t, bias)| LlamaLogitBias::new(LlamaToken(t), bias))
            .collect();
        chain.push(LlamaSampler::logit_bias(n_vocab, &biases));
    }
    let repeat = request.repeat_penalty.unwrap_or(1.0);
    let presence = request.presence_penalty.unwrap_or(0.0);
    let frequency = request.frequency_penalty.unwrap_or(0.0);
    if repeat != 1.0 || presence != 0.0 || frequency != 0.0 {
        let last_n = match request.repeat_last_n.unwrap_or(64) {
            -1 => i32::try_from(n_ctx).unwrap_or(i32::MAX),
            n => n,
        };
        chain.push(LlamaSampler::penalties(
            n_vocab, last_n, repeat, frequency, presence,
        ));
    }
    let temperature = request.temperature.unwrap_or(DEFAULT_TEMPERATURE);
    if temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
        return LlamaSampler::chain_simple(chain);
    }
    let seed = request
        .seed
        .map_or_else(|| crate::protocol::random_u64() as u32, |s| s as u32);
    let (tau, eta) = (
        request.mirostat_tau.unwrap_or(5.0),
        request.mirostat_eta.unwrap_or(0.1),
    );
    match request.mirostat.unwrap_or(0) {
        1 => chain.extend([
            LlamaSampler::temp(temperature),
            LlamaSampler::mirostat(n_vocab, seed, tau, eta, 100),
        ]),
        2 => chain.extend([
            LlamaSampler::temp(temperature),
            LlamaSampler::mirostat_v2(seed, tau, eta),
        ]),
        _ => {
            chain.push(LlamaSampler::top_k(request.top_k.unwrap_or(DEFAULT_TOP_K)));
            if let Some(p) = request.typical_p.filter(|&p| p < 1.0) {
                chain.push(LlamaSampler::typical(p, 1));
            }
            chain.push(LlamaSampler::top_p(
                request.top_p.unwrap_or(DEFAULT_TOP_P),
                1,
            ));
            if let Some(p) = request.min_p.filter(|&p| p > 0.0) {
                chain.push(LlamaSampler::min_p(p, 1));
            }
            chain.extend([LlamaSampler::temp(temperature), LlamaSampler::dist(seed)]);
        }
    }
    LlamaSampler::chain_simple(chain)
}
