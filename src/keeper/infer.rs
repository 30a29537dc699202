//! `rbee keeper infer`: a job on the queen, its stream shown as it comes, and
//! Ctrl+C as the job's cancellation.

use super::args::Infer;
use super::queen::Queen;
use super::render::{JobView, Next};
use crate::http::client;
use crate::http::sse::Frame;
use crate::protocol::{JobCreated, JobRequest, SamplingParams};
use hyper::Method;
use std::io::{IsTerminal, Read};

/// Runs one inference; the exit code on success (0, or 130 after Ctrl+C).
pub async fn infer(queen: &Queen, i: Infer) -> Result<u8, String> {
    let prompt = prompt_of(&i)?;
    if prompt.trim().is_empty() {
        return Err("the prompt is empty".into());
    }
    let woke_queen = queen.wake().await?;
    let result = run_job(queen, job_request(&i, prompt)).await;
    if i.ephemeral && woke_queen {
        queen.say("stopping the queen this call started (--ephemeral)");
        queen.stop().await?;
    }
    result
}

/// The prompt from --prompt, the words, or stdin (when `-` or piped).
fn prompt_of(i: &Infer) -> Result<String, String> {
    if let Some(p) = &i.prompt {
        return Ok(p.clone());
    }
    let from_stdin = i.stdin || (i.words.is_empty() && !std::io::stdin().is_terminal());
    if from_stdin {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("cannot read the prompt from stdin: {e}"))?;
        return Ok(s);
    }
    if i.words.is_empty() {
        return Err("no prompt: pass --prompt, words, or pipe it in".into());
    }
    Ok(i.words.join(" "))
}

/// The model as the hive should see it: a `.gguf` path that exists here
/// becomes `file:` + its absolute path, since a relative path means this
/// shell's directory, not the hive's.
fn model_ref(model: &str) -> String {
    match std::fs::canonicalize(model) {
        Ok(abs) if model.to_ascii_lowercase().ends_with(".gguf") => {
            format!("file:{}", abs.display())
        }
        _ => model.to_string(),
    }
}

fn job_request(i: &Infer, prompt: String) -> JobRequest {
    JobRequest {
        node: i.node.clone(),
        model: model_ref(&i.model),
        prompt,
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
/// connection, a closed stdout or Ctrl+C.
async fn run_job(queen: &Queen, req: JobRequest) -> Result<u8, String> {
    let job: JobCreated = queen.call(Method::POST, "/v1/jobs", Some(&req)).await?;
    let mut stream = client::stream(
        &queen.url(&job.sse_url),
        queen.token.as_deref(),
        None::<&()>,
    )
    .await
    .map_err(|e| e.message)?;
    let tty = std::io::stderr().is_terminal();
    let mut view = JobView::new(std::io::stdout(), std::io::stderr(), queen.quiet, tty);
    loop {
        let frame = tokio::select! {
            f = stream.next() => f,
            _ = tokio::signal::ctrl_c() => {
                queen.cancel(&job.job_id).await;
                return Ok(view.interrupted());
            }
        };
        match frame {
            Some(Frame::Data(data)) => {
                if view.event(&data) == Next::StdoutClosed {
                    return Ok(0);
                }
            }
            Some(Frame::Done) => break,
            None => {
                view.closed_early();
                break;
            }
        }
    }
    view.finish()
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
}
