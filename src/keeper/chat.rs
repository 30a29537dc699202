//! The interactive chat (`rbee keeper run MODEL` on a terminal): the
//! conversation is kept and sent whole each turn, so the worker's prompt
//! cache answers every turn after the first from where the last one ended.
//! Ctrl+C cancels the answer being written, not the session; `/bye` or
//! Ctrl+D leaves.

use super::args::Infer;
use super::infer::{job_request, run_job};
use super::queen::Queen;
use crate::protocol::ChatMessage;
use std::io::{BufRead, Write};
use tokio::sync::mpsc;

const HELP: &str = "/bye (or Ctrl+D) leaves, /clear forgets the conversation, \
\"\"\" starts and ends a message of several lines (so does a line ending in \\), \
Ctrl+C stops an answer";

/// What a line typed at the prompt asks for.
#[derive(Debug, PartialEq, Eq)]
enum Input {
    Say(String),
    Bye,
    Clear,
    Help,
    Unknown(String),
    Nothing,
}

/// Gathers typed lines into messages: `"""` blocks and `\` continuations
/// make one message of several lines.
#[derive(Debug, Default)]
struct Lines {
    /// The lines of a message not finished yet.
    pending: Vec<String>,
    /// Inside a `"""` block.
    block: bool,
}

impl Lines {
    /// Takes one typed line; what it completes, if anything.
    fn push(&mut self, line: &str) -> Option<Input> {
        let line = line.trim_end_matches(['\r', '\n']);
        if self.block {
            if let Some(last) = line.strip_suffix("\"\"\"") {
                self.block = false;
                self.pending.push(last.to_string());
                return Some(self.take());
            }
            self.pending.push(line.to_string());
            return None;
        }
        if self.pending.is_empty() {
            if let Some(rest) = line.trim_start().strip_prefix("\"\"\"") {
                if let Some(whole) = rest.strip_suffix("\"\"\"") {
                    return Some(Input::Say(whole.to_string()));
                }
                self.block = true;
                if !rest.is_empty() {
                    self.pending.push(rest.to_string());
                }
                return None;
            }
            let command = line.trim();
            if command.starts_with('/') {
                return Some(match command {
                    "/bye" | "/exit" | "/quit" => Input::Bye,
                    "/clear" => Input::Clear,
                    "/?" | "/help" => Input::Help,
                    other => Input::Unknown(other.to_string()),
                });
            }
        }
        match line.strip_suffix('\\') {
            Some(more) => {
                self.pending.push(more.to_string());
                None
            }
            None => {
                self.pending.push(line.to_string());
                Some(self.take())
            }
        }
    }

    fn take(&mut self) -> Input {
        let text = std::mem::take(&mut self.pending).join("\n");
        if text.trim().is_empty() {
            Input::Nothing
        } else {
            Input::Say(text)
        }
    }

    /// The prompt to show: a fresh one, or one that says a message goes on.
    fn prompt(&self) -> &'static str {
        if self.pending.is_empty() && !self.block {
            ">>> "
        } else {
            "... "
        }
    }
}

/// Lines from stdin as they are typed, `None` at its end, read on a thread
/// of their own (a blocking read must not hold the runtime).
fn typed_lines() -> mpsc::UnboundedReceiver<Option<String>> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut line = String::new();
        loop {
            line.clear();
            match stdin.lock().read_line(&mut line) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(_) => {
                    if tx.send(Some(line.clone())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Runs the chat until `/bye` or the end of stdin; exit code 0.
pub async fn chat(queen: &Queen, i: &Infer, model: &str) -> Result<u8, String> {
    queen.wake().await?;
    let start: Vec<ChatMessage> = i
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s.as_str()))
        .collect();
    let mut history = start.clone();
    let mut typed = typed_lines();
    let mut lines = Lines::default();
    eprintln!("chatting with {model}: {HELP}");
    loop {
        eprint!("{}", lines.prompt());
        let _ = std::io::stderr().flush();
        let line = tokio::select! {
            line = typed.recv() => line.flatten(),
            _ = tokio::signal::ctrl_c() => {
                lines = Lines::default();
                eprintln!("\n(/bye or Ctrl+D leaves)");
                continue;
            }
        };
        let Some(line) = line else {
            eprintln!();
            return Ok(0);
        };
        let said = match lines.push(&line) {
            None | Some(Input::Nothing) => continue,
            Some(Input::Bye) => return Ok(0),
            Some(Input::Clear) => {
                history = start.clone();
                eprintln!("(conversation cleared)");
                continue;
            }
            Some(Input::Help) => {
                eprintln!("{HELP}");
                continue;
            }
            Some(Input::Unknown(c)) => {
                eprintln!("unknown command {c}; /? lists them");
                continue;
            }
            Some(Input::Say(text)) => text,
        };
        history.push(ChatMessage::new("user", said));
        match run_job(queen, job_request(i, model, history.clone()), i, true).await {
            // A stopped answer stays as far as it went: it was read.
            Ok((_, answer)) if !answer.is_empty() => {
                history.push(ChatMessage::new("assistant", answer))
            }
            Ok(_) => {
                history.pop();
            }
            Err(e) => {
                eprintln!("error: {e}");
                history.pop();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(typed: &[&str]) -> Vec<Input> {
        let mut lines = Lines::default();
        typed.iter().filter_map(|l| lines.push(l)).collect()
    }

    #[test]
    fn lines_become_messages_and_commands() {
        assert_eq!(
            feed(&["hello there\n", "/clear\n", "  \n", "/bye\n"]),
            [
                Input::Say("hello there".into()),
                Input::Clear,
                Input::Nothing,
                Input::Bye
            ]
        );
        assert_eq!(
            feed(&["\"\"\"first line\n", "/not a command\n", "last\"\"\"\n"]),
            [Input::Say("first line\n/not a command\nlast".into())]
        );
        assert_eq!(
            feed(&["one \\\n", "two\n", "\"\"\"inline\"\"\"\n", "/wat\n"]),
            [
                Input::Say("one \ntwo".into()),
                Input::Say("inline".into()),
                Input::Unknown("/wat".into())
            ]
        );
        let mut lines = Lines::default();
        assert_eq!(lines.prompt(), ">>> ");
        lines.push("\"\"\"");
        assert_eq!(lines.prompt(), "... ");
    }
}
