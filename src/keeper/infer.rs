//! `rbee keeper infer` / `run`: a job on the queen, its stream shown as it
//! comes, and Ctrl+C as the job's cancellation. The prompt goes through the
//! model's chat template (`--raw` sends it as plain text); with no prompt and
//! a terminal on stdin, an interactive chat (`chat`).

use super::args::Infer;
use super::queen::Queen;
use super::render::{JobView, Next};
use crate::http::client;
use crate::http::sse::Frame;
use crate::protocol::{ChatMessage, Constraint, JobCreated, JobRequest, SamplingParams};
use hyper::Method;
use std::io::{IsTerminal, Read};

/// Runs one inference, or a chat; the exit code on success (0, or 130 after Ctrl+C).
pub async fn infer(queen: &Queen, i: Infer, default_model: Option<String>) -> Result<u8, String> {
    let model = i.model.clone().or(default_model).ok_or(
        "no model: pass --model MODEL (or `rbee keeper run MODEL`), \
         or set a default with `rbee keeper config set model NAME`",
    )?;
    let stdin = Stdin::here();
    let Some(prompt) = prompt_of(&i, &stdin)? else {
        return super::chat::chat(queen, &i, &model).await;
    };
    if prompt.trim().is_empty() {
        return Err("the prompt is empty".into());
    }
    let woke_queen = queen.wake().await?;
    let mut req = job_request(&i, &model, conversation(&i, prompt));
    req.constraint = constraint_of(&i)?;
    let result = run_job(queen, req, &i, false).await.map(|(code, _)| code);
    if i.ephemeral && woke_queen {
        queen.say("stopping the queen this call started (--ephemeral)");
        queen.stop().await?;
    }
    result
}

/// What stdin is, for where the prompt comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdin {
    /// A person types there: no prompt means a chat.
    Terminal,
    /// A pipe or a file: it holds (more of) the prompt.
    Piped,
    /// Nothing to read (`/dev/null`, a closed descriptor).
    Nothing,
}

impl Stdin {
    fn here() -> Stdin {
        if std::io::stdin().is_terminal() {
            return Stdin::Terminal;
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileTypeExt;
            let meta = std::fs::metadata("/dev/stdin");
            match meta.map(|m| m.file_type()) {
                Ok(t) if t.is_fifo() || t.is_file() || t.is_socket() => Stdin::Piped,
                _ => Stdin::Nothing,
            }
        }
        #[cfg(not(unix))]
        Stdin::Piped
    }
}

/// The prompt: the words or `--prompt` (not both), followed by what is piped
/// in (or read for `-`), as `echo … | ollama run MODEL "summarize:"` does;
/// `None` for a chat (nothing given, a terminal on stdin).
fn prompt_of(i: &Infer, stdin: &Stdin) -> Result<Option<String>, String> {
    let given = match (&i.prompt, i.words.is_empty()) {
        (Some(_), false) => {
            return Err(format!(
                "the prompt is given twice: --prompt and the words {:?}; give one",
                i.words.join(" ")
            ))
        }
        (Some(p), true) => Some(p.clone()),
        (None, false) => Some(i.words.join(" ")),
        (None, true) => None,
    };
    // `-` reads stdin whatever it is (on a terminal, until Ctrl+D).
    if !(i.stdin || *stdin == Stdin::Piped) {
        return match (given, stdin) {
            (Some(p), _) => Ok(Some(p)),
            (None, Stdin::Terminal) => Ok(None),
            (None, _) => Err("no prompt: give words, --prompt, or pipe it in".into()),
        };
    }
    let mut piped = String::new();
    std::io::stdin()
        .read_to_string(&mut piped)
        .map_err(|e| format!("cannot read the prompt from stdin: {e}"))?;
    Ok(Some(join_prompt(given, &piped)))
}

/// The given prompt, then a blank line, then what came on stdin without its last newline.
fn join_prompt(given: Option<String>, piped: &str) -> String {
    let piped = piped.trim_end_matches(['\n', '\r']);
    match given {
        Some(g) if piped.trim().is_empty() => g,
        Some(g) => format!("{g}\n\n{piped}"),
        None => piped.to_string(),
    }
}

/// `--json-schema FILE` as the job's constraint, the schema checked here first.
fn constraint_of(i: &Infer) -> Result<Option<Constraint>, String> {
    let Some(path) = &i.json_schema else {
        return Ok(None);
    };
    let text = crate::read_small_file(path, crate::http::MAX_BODY_BYTES as u64)
        .map_err(|e| e.unwrap_or_else(|| format!("there is no schema file {}", path.display())))?;
    let schema: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    crate::schema::check(&schema, "json_schema")
        .map_err(|e| format!("{}: {}", path.display(), e.message))?;
    Ok(Some(Constraint::JsonSchema { schema }))
}

/// The model as the hive should see it: a `.gguf` path that exists here
/// becomes `file:` + its absolute path, since a relative path means this
/// shell's directory, not the hive's.
pub fn model_ref(model: &str) -> String {
    match std::fs::canonicalize(model) {
        Ok(abs) if model.to_ascii_lowercase().ends_with(".gguf") => {
            format!("file:{}", abs.display())
        }
        _ => model.to_string(),
    }
}

/// The messages of a one-shot question: the system message, if any, and the prompt.
fn conversation(i: &Infer, prompt: String) -> Vec<ChatMessage> {
    let mut messages: Vec<ChatMessage> = i
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s.as_str()))
        .collect();
    messages.push(ChatMessage::new("user", prompt));
    messages
}

/// The job for `messages`: rendered with the model's chat template, or with
/// `--raw` their text as the prompt.
pub fn job_request(i: &Infer, model: &str, messages: Vec<ChatMessage>) -> JobRequest {
    let (prompt, messages) = if i.raw {
        let text: Vec<String> = messages.into_iter().map(|m| m.content).collect();
        (text.join("\n\n"), None)
    } else {
        (String::new(), Some(messages))
    };
    JobRequest {
        node: i.node.clone(),
        model: model_ref(model),
        prompt,
        messages,
        constraint: None,
        sampling: SamplingParams {
            max_tokens: i.max_tokens,
            temperature: i.temperature,
            top_p: i.top_p,
            top_k: i.top_k,
            seed: i.seed.map(i64::from),
            stop: i.stop.clone(),
            ..SamplingParams::default()
        },
        cache_prompt: None,
    }
}

/// Creates the job and shows its stream until `[DONE]`, the end of the
/// connection, a closed stdout or Ctrl+C; the exit code and the answer's text.
/// With `--verbose`, the summary goes to stderr after it. A chat's turns
/// leave out the narration every job has.
pub async fn run_job(
    queen: &Queen,
    req: JobRequest,
    i: &Infer,
    chat: bool,
) -> Result<(u8, String), String> {
    let job: JobCreated = queen.call(Method::POST, "/v1/jobs", Some(&req)).await?;
    let mut stream = client::stream(
        &queen.url(&job.sse_url),
        queen.token.as_deref(),
        None::<&()>,
    )
    .await
    .map_err(|e| e.message)?;
    let mut view = JobView::new(
        std::io::stdout(),
        std::io::stderr(),
        queen.quiet,
        std::io::stderr().is_terminal(),
        std::io::stdout().is_terminal(),
    );
    view.routine_hidden = chat;
    let outcome = loop {
        let frame = tokio::select! {
            f = stream.next() => f,
            _ = tokio::signal::ctrl_c() => {
                queen.cancel(&job.job_id).await;
                break Ok(view.interrupted());
            }
        };
        match frame {
            Some(Frame::Data(data)) => {
                if view.event(&data) == Next::StdoutClosed {
                    break Ok(0);
                }
            }
            Some(Frame::Done) => break view.finish(),
            None => {
                view.closed_early();
                break view.finish();
            }
        }
    };
    if i.verbose && !queen.quiet {
        if let Some(summary) = view.summary() {
            eprintln!("{summary}");
        }
    }
    outcome.map(|code| (code, std::mem::take(&mut view.answer)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_gguf_path_becomes_an_absolute_file_ref() {
        let dir = std::env::temp_dir().join(format!("rbee-keeper-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("Tiny.GGUF");
        std::fs::write(&file, b"GGUF").unwrap();
        let abs = std::fs::canonicalize(&file).unwrap();
        assert_eq!(
            model_ref(file.to_str().unwrap()),
            format!("file:{}", abs.display())
        );
        // Not a .gguf, or not here: the hive resolves it.
        assert_eq!(model_ref(dir.to_str().unwrap()), dir.to_str().unwrap());
        assert_eq!(model_ref("nowhere/x.gguf"), "nowhere/x.gguf");
        assert_eq!(model_ref("hf:org/repo:Q4_1"), "hf:org/repo:Q4_1");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn infer(words: &[&str], prompt: Option<&str>) -> Infer {
        Infer {
            words: words.iter().map(|w| w.to_string()).collect(),
            prompt: prompt.map(str::to_string),
            ..Infer::default()
        }
    }

    #[test]
    fn where_the_prompt_comes_from() {
        let words = infer(&["why", "is", "the", "sky", "blue"], None);
        assert_eq!(
            prompt_of(&words, &Stdin::Nothing).unwrap().as_deref(),
            Some("why is the sky blue")
        );
        assert_eq!(
            prompt_of(&words, &Stdin::Terminal).unwrap().as_deref(),
            Some("why is the sky blue")
        );
        // Nothing given on a terminal: a chat; elsewhere, an error.
        assert_eq!(prompt_of(&infer(&[], None), &Stdin::Terminal), Ok(None));
        assert!(prompt_of(&infer(&[], None), &Stdin::Nothing)
            .unwrap_err()
            .contains("no prompt"));
        let twice = prompt_of(&infer(&["b"], Some("a")), &Stdin::Nothing).unwrap_err();
        assert!(twice.contains("given twice"), "{twice}");
    }

    #[test]
    fn piped_text_follows_the_words_without_its_last_newline() {
        assert_eq!(
            join_prompt(Some("summarize:".into()), "line one\nline two\n"),
            "summarize:\n\nline one\nline two"
        );
        assert_eq!(join_prompt(None, "Once upon a time\n"), "Once upon a time");
        assert_eq!(join_prompt(Some("hi".into()), "\n"), "hi");
    }

    #[test]
    fn the_prompt_is_a_chat_unless_raw() {
        let mut i = infer(&[], None);
        i.system = Some("Be brief.".into());
        let chat = job_request(&i, "m", conversation(&i, "hi".into()));
        assert_eq!(chat.prompt, "");
        assert_eq!(
            chat.messages,
            Some(vec![
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "hi")
            ])
        );
        i.raw = true;
        let raw = job_request(&i, "m", conversation(&i, "Once upon a time".into()));
        assert_eq!(
            (raw.prompt.as_str(), raw.messages),
            ("Be brief.\n\nOnce upon a time", None)
        );
    }
}
