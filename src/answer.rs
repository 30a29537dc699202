//! One answer as every front reads it (OpenAI, Ollama, Anthropic): a worker's
//! or a job's inference events become text that may go out now, and at the end
//! the tool calls found in what was held back, the stop reason and the counts.
//! Each front only puts these pieces into its own protocol's shape, so text is
//! held back from where a call may begin in one place, for all of them.

use crate::protocol::{ApiError, ErrorCode, InferenceEvent, StopReason, TokenLogprob, ToolCall};
use tokio::sync::mpsc::UnboundedReceiver;

pub const ENGINE_STOPPED: &str = "the engine stopped before the answer was complete";

/// What a front sends next.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Text that can go out now.
    Text(String),
    /// The answer is complete.
    End(Ending),
    /// The answer failed; nothing follows.
    Failed(ApiError),
}

/// How an answer ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Ending {
    /// The tool calls the answer made (the request had tools), in order.
    pub calls: Vec<ToolCall>,
    pub reason: StopReason,
    pub tokens_out: u32,
    /// Prompt tokens that came from the prompt cache.
    pub cached_tokens: u32,
    /// Milliseconds the worker spent generating.
    pub decode_time_ms: u64,
    /// The tokens it generated in that time: `tokens_out`, or after a
    /// failover the last worker's share of them.
    pub decoded_tokens: u32,
    /// Every token's log-probability, when the request asked and the answer
    /// was read whole ([`Pieces::whole`]).
    pub logprobs: Vec<TokenLogprob>,
}

impl Ending {
    /// The decode speed, tokens/s: the last worker's tokens over its time (0 when it spent none).
    pub fn tokens_per_second(&self) -> f64 {
        match self.decode_time_ms {
            0 => 0.0,
            ms => f64::from(self.decoded_tokens) * 1000.0 / ms as f64,
        }
    }
}

/// Reads an answer's events as pieces. With `tool_calls`, text that may be
/// (the start of) a call is held until it is known; a call is never sent as text.
pub struct Pieces {
    events: UnboundedReceiver<InferenceEvent>,
    tool_calls: bool,
    held: String,
    sent_text: bool,
    next: Option<Piece>,
    /// Log-probabilities of the text read so far and not yet taken.
    logprobs: Vec<TokenLogprob>,
}

impl Pieces {
    pub fn new(events: UnboundedReceiver<InferenceEvent>, tool_calls: bool) -> Pieces {
        Pieces {
            events,
            tool_calls,
            held: String::new(),
            sent_text: false,
            next: None,
            logprobs: Vec::new(),
        }
    }

    /// The next piece; after `End` or `Failed`, nothing more is to be read.
    pub async fn next(&mut self) -> Piece {
        if let Some(piece) = self.next.take() {
            return piece;
        }
        loop {
            let event = self.events.recv().await;
            match event {
                Some(InferenceEvent::Token { t, logprobs, .. }) => {
                    self.logprobs.extend(logprobs);
                    if !self.tool_calls {
                        return Piece::Text(t);
                    }
                    self.held.push_str(&t);
                    let n = crate::tool_calls::sendable(&self.held, !self.sent_text);
                    if n > 0 {
                        self.sent_text = true;
                        return Piece::Text(self.held.drain(..n).collect());
                    }
                }
                Some(InferenceEvent::End {
                    tokens_out,
                    stop_reason,
                    cached_tokens,
                    decode_time_ms,
                    figures,
                    ..
                }) => {
                    let held = std::mem::take(&mut self.held);
                    let (text, calls) = match self.tool_calls {
                        true => crate::tool_calls::parse(&held).unwrap_or((held, Vec::new())),
                        false => (held, Vec::new()),
                    };
                    let end = Piece::End(Ending {
                        calls,
                        reason: stop_reason,
                        tokens_out,
                        cached_tokens,
                        decode_time_ms,
                        decoded_tokens: figures
                            .and_then(|f| f.decoded_tokens)
                            .unwrap_or(tokens_out),
                        logprobs: Vec::new(),
                    });
                    if text.is_empty() {
                        return end;
                    }
                    self.next = Some(end);
                    return Piece::Text(text);
                }
                Some(InferenceEvent::Error { code, message }) => {
                    return Piece::Failed(ApiError::new(code, message))
                }
                Some(InferenceEvent::Started { .. }) => {}
                None => {
                    return Piece::Failed(ApiError::new(ErrorCode::InferenceFailed, ENGINE_STOPPED))
                }
            }
        }
    }

    /// The next piece, or `None` once the client behind `tx` has gone (a
    /// stream's producer stops there).
    pub async fn next_for<T>(&mut self, tx: &tokio::sync::mpsc::Sender<T>) -> Option<Piece> {
        tokio::select! {
            piece = self.next() => Some(piece),
            () = tx.closed() => None,
        }
    }

    /// The log-probabilities of the text returned so far, once each.
    pub fn take_logprobs(&mut self) -> Vec<TokenLogprob> {
        std::mem::take(&mut self.logprobs)
    }

    /// The whole answer: its text and how it ended, or why it failed.
    pub async fn whole(mut self) -> Result<(String, Ending), ApiError> {
        let mut text = String::new();
        loop {
            match self.next().await {
                Piece::Text(t) => text.push_str(&t),
                Piece::End(mut end) => {
                    end.logprobs = self.take_logprobs();
                    return Ok((text, end));
                }
                Piece::Failed(e) => return Err(e),
            }
        }
    }
}

/// Each token's log-probability with its likeliest alternatives
/// (`top_logprobs`), in the shape OpenAI's chat and Responses answers share;
/// with `ids`, each token's vocabulary id too (llama-server's `n_probs`).
pub fn logprob_list(lps: &[TokenLogprob], ids: bool) -> Vec<serde_json::Value> {
    let one = |l: &TokenLogprob| {
        let mut v = serde_json::json!({"token": l.token, "logprob": l.logprob, "bytes": l.bytes});
        if ids {
            v["id"] = l.id.into();
        }
        v
    };
    lps.iter()
        .map(|l| {
            let mut v = one(l);
            v["top_logprobs"] = l.top.iter().map(one).collect();
            v
        })
        .collect()
}

/// A request no route takes (404, 405), answered in the shape of the
/// protocol its path belongs to: Ollama's under `/api/`, Anthropic's for
/// `/v1/messages`, OpenAI's (whose clients read rbee's own fields too) for
/// the rest of `/v1/`, rbee's elsewhere.
pub fn route_error(path: &str, e: ApiError) -> hyper::Response<crate::http::Body> {
    if path.starts_with("/api/") {
        crate::ollama::error(e)
    } else if path.starts_with("/v1/messages") {
        crate::anthropic::error(e)
    } else if path.starts_with("/v1/") {
        crate::openai::error(e)
    } else {
        crate::http::error(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(tokens: &[&str]) -> UnboundedReceiver<InferenceEvent> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for (i, t) in tokens.iter().enumerate() {
            tx.send(InferenceEvent::Token {
                t: t.to_string(),
                i: i as u32,
                ids: vec![],
                logprobs: vec![],
            })
            .unwrap();
        }
        tx.send(InferenceEvent::End {
            tokens_out: tokens.len() as u32,
            decode_time_ms: 5,
            stop_reason: StopReason::Eos,
            cached_tokens: 2,
            ids: vec![],
            figures: None,
        })
        .unwrap();
        rx
    }

    async fn all(mut p: Pieces) -> Vec<Piece> {
        let mut out = Vec::new();
        loop {
            let piece = p.next().await;
            let last = !matches!(piece, Piece::Text(_));
            out.push(piece);
            if last {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn text_goes_out_as_it_comes_and_calls_are_held_back() {
        let plain = all(Pieces::new(events(&["Hel", "lo"]), false)).await;
        assert_eq!(plain[0], Piece::Text("Hel".into()));
        assert_eq!(plain[1], Piece::Text("lo".into()));
        assert!(matches!(&plain[2], Piece::End(e) if e.calls.is_empty() && e.cached_tokens == 2));

        let call = [
            "Sure. ",
            "<tool_call>",
            r#"{"name":"f","arguments":{"a":1}}"#,
            "</tool_call>",
        ];
        let pieces = all(Pieces::new(events(&call), true)).await;
        let text: String = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(text.trim(), "Sure.");
        let Some(Piece::End(end)) = pieces.last() else {
            panic!("{pieces:?}")
        };
        assert_eq!(end.calls.len(), 1);
        assert_eq!(end.calls[0].function.name, "f");

        let (text, end) = Pieces::new(events(&["a", "b"]), true)
            .whole()
            .await
            .unwrap();
        assert_eq!((text.as_str(), end.tokens_out), ("ab", 2));
    }

    #[tokio::test]
    async fn a_vanished_engine_is_a_failure() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<InferenceEvent>();
        drop(tx);
        let e = Pieces::new(rx, false).whole().await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InferenceFailed);
    }
}
