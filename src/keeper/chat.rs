//! The interactive chat (`rbee keeper run MODEL` on a terminal): the
//! conversation is kept and sent whole each turn, so the worker's prompt
//! cache answers every turn after the first from where the last one ended.
//! Lines are edited as in a shell (arrows, history kept across sessions
//! beside the config file, Ctrl+R searches it). Ctrl+C cancels the answer
//! being written, not the session; `/bye` or Ctrl+D leaves.

use super::args::Infer;
use super::infer::{job_request, run_job};
use super::queen::Queen;
use crate::protocol::{ChatMessage, SamplingParams};
use std::path::PathBuf;
use tokio::sync::mpsc;

const HELP: &str = "/bye (or Ctrl+D) leaves, /clear forgets the conversation, \
/set parameter NAME VALUE (temperature, top_p, top_k, min_p, num_predict, seed, stop, \
repeat_penalty, …), /set system TEXT, /show info, \
\"\"\" starts and ends a message of several lines (so does a line ending in \\), \
Ctrl+C stops an answer";

/// What a line typed at the prompt asks for.
#[derive(Debug, PartialEq, Eq)]
enum Input {
    Say(String),
    Bye,
    Clear,
    Help,
    /// `/set …`: what follows.
    Set(String),
    /// `/show …`: what follows.
    Show(String),
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
                let (word, rest) = command.split_once(' ').unwrap_or((command, ""));
                let rest = rest.trim().to_string();
                return Some(match word {
                    "/bye" | "/exit" | "/quit" => Input::Bye,
                    "/clear" => Input::Clear,
                    "/?" | "/help" => Input::Help,
                    "/set" => Input::Set(rest),
                    "/show" => Input::Show(rest),
                    _ => Input::Unknown(command.to_string()),
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

/// What `/set` changes, as `ollama run` has it: sampling parameters (Ollama's
/// names, `num_predict` for the answer's length) and the system message.
#[derive(Debug, Default, Clone, PartialEq)]
struct Settings {
    /// Parameters set, by rbee's field name, over the command line's.
    params: serde_json::Map<String, serde_json::Value>,
    system: Option<String>,
}

impl Settings {
    /// `/set parameter NAME VALUE` or `/set system TEXT`: what was set, or why not.
    fn set(&mut self, rest: &str, base: &SamplingParams) -> Result<String, String> {
        let (what, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        match what {
            "system" if !rest.trim().is_empty() => {
                self.system = Some(rest.trim().to_string());
                Ok("set the system message".into())
            }
            "parameter" => {
                let (name, value) = rest
                    .trim()
                    .split_once(' ')
                    .ok_or("/set parameter NAME VALUE")?;
                let field = if name == "num_predict" {
                    "max_tokens"
                } else {
                    name
                };
                let value = value.trim();
                let json = match field {
                    "stop" => serde_json::json!(value.split_whitespace().collect::<Vec<_>>()),
                    _ => serde_json::from_str::<serde_json::Value>(value)
                        .ok()
                        .filter(serde_json::Value::is_number)
                        .ok_or(format!("{name} takes a number, not {value:?}"))?,
                };
                let mut tried = self.clone();
                tried.params.insert(field.to_string(), json);
                tried.apply(base)?;
                let known = serde_json::to_value(tried.apply(base)?).unwrap_or_default();
                if known.get(field).is_none() {
                    return Err(format!("no parameter {name}: temperature, top_p, top_k, min_p, typical_p, num_predict, seed, stop, repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty, mirostat, mirostat_tau, mirostat_eta"));
                }
                *self = tried;
                Ok(format!("set parameter {name} to {value}"))
            }
            _ => Err("/set parameter NAME VALUE, or /set system TEXT".into()),
        }
    }

    /// The command line's sampling with the parameters set over it, checked.
    fn apply(&self, base: &SamplingParams) -> Result<SamplingParams, String> {
        let mut all = match serde_json::to_value(base) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        all.extend(self.params.clone());
        let sampling: SamplingParams =
            serde_json::from_value(serde_json::Value::Object(all)).map_err(|e| e.to_string())?;
        sampling.validate().map_err(|e| e.message)?;
        Ok(sampling)
    }

    /// `/show info`, `/show parameters`, `/show system`.
    fn show(&self, what: &str, model: &str, base: &SamplingParams) -> String {
        let params = match self
            .apply(base)
            .map(|s| serde_json::to_value(s).unwrap_or_default())
        {
            Ok(serde_json::Value::Object(m)) if !m.is_empty() => m
                .iter()
                .map(|(k, v)| format!("  {k} {v}"))
                .collect::<Vec<_>>()
                .join("\n"),
            _ => "  (the model's and the worker's defaults)".into(),
        };
        let system = self.system.as_deref().unwrap_or("(none)");
        match what {
            "parameters" => format!("parameters:\n{params}"),
            "system" => format!("system: {system}"),
            _ => format!("model: {model}\nsystem: {system}\nparameters:\n{params}"),
        }
    }
}

/// What the line editor read.
#[derive(Debug)]
enum Typed {
    Line(String),
    /// Ctrl+C at the prompt: the line (and a message of several lines) dropped.
    Interrupted,
    /// Ctrl+D, or the terminal gone.
    End,
}

/// The line editor (rustyline: arrows, history across sessions, Ctrl+R), on
/// a thread of its own: a blocking read must not hold the runtime, and the
/// terminal is in raw mode only while a line is being typed, so an answer
/// is written (and Ctrl+C stops it) in the terminal's usual mode.
struct Typing {
    ask: std::sync::mpsc::Sender<&'static str>,
    lines: mpsc::UnboundedReceiver<Typed>,
}

impl Typing {
    /// An editor keeping its history in `history` (a file, read now and
    /// appended to after every line, so two chats at once both keep theirs).
    fn start(history: PathBuf) -> Typing {
        let (ask, asked) = std::sync::mpsc::channel::<&'static str>();
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            let config = rustyline::Config::builder()
                .max_history_size(1000)
                .and_then(|b| b.history_ignore_dups(true))
                .map(|b| {
                    b.history_ignore_space(true)
                        .auto_add_history(true)
                        // Prompts and editing on the terminal even when stdout is
                        // a file: the answer goes there, the prompts do not.
                        .behavior(rustyline::Behavior::PreferTerm)
                        .build()
                });
            let editor = config.and_then(rustyline::DefaultEditor::with_config);
            let mut editor = match editor {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("error: no line editor on this terminal: {e}");
                    let _ = tx.send(Typed::End);
                    return;
                }
            };
            // No file yet is the first chat; one unreadable is said once.
            if history.exists() {
                if let Err(e) = editor.load_history(&history) {
                    eprintln!("(history {} not read: {e})", history.display());
                }
            }
            while let Ok(prompt) = asked.recv() {
                let typed = match editor.readline(prompt) {
                    Ok(line) => {
                        if let Some(dir) = history.parent() {
                            let _ = std::fs::create_dir_all(dir);
                        }
                        let _ = editor.append_history(&history);
                        Typed::Line(line)
                    }
                    Err(rustyline::error::ReadlineError::Interrupted) => Typed::Interrupted,
                    Err(_) => Typed::End,
                };
                let end = matches!(typed, Typed::End);
                if tx.send(typed).is_err() || end {
                    return;
                }
            }
        });
        Typing { ask, lines }
    }

    /// The next line typed after `prompt`.
    async fn read(&mut self, prompt: &'static str) -> Typed {
        if self.ask.send(prompt).is_err() {
            return Typed::End;
        }
        self.lines.recv().await.unwrap_or(Typed::End)
    }
}

/// Where the chat's history is kept: beside the keeper's config file.
fn history_path() -> PathBuf {
    super::config::path().with_file_name("history")
}

/// Runs the chat until `/bye` or the end of stdin; exit code 0.
pub async fn chat(queen: &Queen, i: &Infer, model: &str) -> Result<u8, String> {
    queen.wake().await?;
    let mut settings = Settings {
        system: i.system.clone(),
        ..Settings::default()
    };
    let base = job_request(i, model, Vec::new()).sampling;
    let start = |s: &Settings| -> Vec<ChatMessage> {
        s.system
            .iter()
            .map(|t| ChatMessage::new("system", t.as_str()))
            .collect()
    };
    let mut history = start(&settings);
    let mut typing = Typing::start(history_path());
    let mut lines = Lines::default();
    eprintln!("chatting with {model}: {HELP}");
    loop {
        let line = match typing.read(lines.prompt()).await {
            Typed::Line(line) => line,
            Typed::Interrupted => {
                lines = Lines::default();
                eprintln!("(/bye or Ctrl+D leaves)");
                continue;
            }
            Typed::End => return Ok(0),
        };
        let said = match lines.push(&line) {
            None | Some(Input::Nothing) => continue,
            Some(Input::Bye) => return Ok(0),
            Some(Input::Clear) => {
                history = start(&settings);
                eprintln!("(conversation cleared)");
                continue;
            }
            Some(Input::Help) => {
                eprintln!("{HELP}");
                continue;
            }
            Some(Input::Set(rest)) => {
                match settings.set(&rest, &base) {
                    Ok(done) => eprintln!("({done})"),
                    Err(e) => eprintln!("error: {e}"),
                }
                // A new system message leads the conversation from here.
                history.retain(|m| m.role != "system");
                history.splice(0..0, start(&settings));
                continue;
            }
            Some(Input::Show(what)) => {
                eprintln!("{}", settings.show(&what, model, &base));
                continue;
            }
            Some(Input::Unknown(c)) => {
                eprintln!("unknown command {c}; /? lists them");
                continue;
            }
            Some(Input::Say(text)) => text,
        };
        history.push(ChatMessage::new("user", said));
        let mut request = job_request(i, model, history.clone());
        request.sampling = settings.apply(&base).unwrap_or(request.sampling);
        match run_job(queen, request, i, true).await {
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
    fn set_and_show_change_the_parameters_and_the_system_message() {
        let base = SamplingParams {
            temperature: Some(0.7),
            ..SamplingParams::default()
        };
        let mut s = Settings::default();
        assert!(s.set("parameter temperature 0", &base).is_ok());
        assert!(s.set("parameter num_predict 12", &base).is_ok());
        assert!(s.set("parameter stop ### END", &base).is_ok());
        let applied = s.apply(&base).unwrap();
        assert_eq!(applied.temperature, Some(0.0));
        assert_eq!(applied.max_tokens, Some(12));
        assert_eq!(applied.stop, ["###", "END"]);
        for bad in [
            "parameter temperature 9",
            "parameter temperature hot",
            "parameter wat 1",
            "parameter",
            "nonsense",
        ] {
            assert!(s.set(bad, &base).is_err(), "{bad}");
        }
        assert_eq!(
            s.apply(&base).unwrap().temperature,
            Some(0.0),
            "a refused /set changes nothing"
        );
        assert!(s.set("system Answer in French.", &base).is_ok());
        let info = s.show("info", "smol", &base);
        assert!(
            info.contains("model: smol")
                && info.contains("Answer in French.")
                && info.contains("max_tokens 12"),
            "{info}"
        );
        assert_eq!(
            feed(&["/set parameter top_k 5\n", "/show info\n"]),
            [
                Input::Set("parameter top_k 5".into()),
                Input::Show("info".into())
            ]
        );
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
