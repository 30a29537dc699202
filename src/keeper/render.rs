//! Showing a job stream: tokens to stdout as they come, narration and
//! progress to stderr, and how the job ended.
//!
//! The writers are parameters so the decisions are tested on buffers.

use crate::protocol::{
    ClusterEvent, DownloadEvent, InferenceEvent, JobEvent, JobFigures, LoadingEvent, StopReason,
};
use std::io::Write;

/// Whether to keep reading the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Read,
    /// stdout was closed (`| head`): the reader has what it wanted.
    StdoutClosed,
}

/// One job stream being shown.
pub struct JobView<O: Write, E: Write> {
    out: O,
    err: E,
    /// Nothing on stderr but the final error.
    quiet: bool,
    /// Narration of what happens on every job (a worker reused) is left out:
    /// in a chat it would come before every answer.
    pub routine_hidden: bool,
    progress: Progress,
    /// stdout is a terminal: an answer that did not end its line gets a
    /// newline there, so the shell prompt does not follow it. Off a terminal
    /// stdout holds exactly the model's text.
    out_tty: bool,
    /// The text written so far (a chat keeps it as the assistant's turn).
    pub answer: String,
    /// The job's error, reported once the stream ends.
    failure: Option<String>,
    /// The prompt's length, from `started`.
    prompt_tokens: u32,
    /// The `end` event's figures, once it came.
    end: Option<Ended>,
}

/// What `end` said, for the summary.
struct Ended {
    tokens_out: u32,
    decode_time_ms: u64,
    stop_reason: StopReason,
    cached_tokens: u32,
    figures: Option<JobFigures>,
}

impl<O: Write, E: Write> JobView<O, E> {
    /// `tty`: stderr is a terminal, so progress is a bar redrawn in place;
    /// `out_tty`: stdout is one.
    pub fn new(out: O, err: E, quiet: bool, tty: bool, out_tty: bool) -> Self {
        JobView {
            out,
            err,
            quiet,
            routine_hidden: false,
            progress: Progress::new(quiet, tty),
            out_tty,
            answer: String::new(),
            failure: None,
            prompt_tokens: 0,
            end: None,
        }
    }

    /// Shows one `data:` payload; one this build cannot read is skipped.
    pub fn event(&mut self, data: &str) -> Next {
        let Ok(event) = serde_json::from_str::<JobEvent>(data) else {
            return Next::Read;
        };
        match event {
            JobEvent::Inference(InferenceEvent::Token { t, .. }) => return self.token(&t),
            JobEvent::Inference(InferenceEvent::Error { message, code }) => {
                self.failure = Some(format!("{message} ({code})"));
            }
            JobEvent::Inference(InferenceEvent::Started { prompt_tokens, .. }) => {
                self.prompt_tokens = prompt_tokens;
            }
            JobEvent::Inference(InferenceEvent::End {
                tokens_out,
                decode_time_ms,
                stop_reason,
                cached_tokens,
                figures,
                ..
            }) => {
                self.end = Some(Ended {
                    tokens_out,
                    decode_time_ms,
                    stop_reason,
                    cached_tokens,
                    figures,
                });
            }
            JobEvent::Cluster(ClusterEvent::Narration {
                actor,
                action,
                human,
            }) => {
                self.progress.clear(&mut self.err);
                let hidden = self.quiet || (self.routine_hidden && action == "reuse");
                if !hidden {
                    let _ = writeln!(self.err, "[{actor}] {human}");
                }
            }
            JobEvent::Cluster(ClusterEvent::Download(e)) => {
                self.progress.download(&mut self.err, &e)
            }
            JobEvent::Cluster(ClusterEvent::Loading(e)) => self.progress.loading(&mut self.err, &e),
        }
        Next::Read
    }

    fn token(&mut self, t: &str) -> Next {
        self.progress.clear(&mut self.err);
        if self
            .out
            .write_all(t.as_bytes())
            .and_then(|()| self.out.flush())
            .is_err()
        {
            return Next::StdoutClosed;
        }
        self.answer.push_str(t);
        Next::Read
    }

    /// The stream ended without `[DONE]`.
    pub fn closed_early(&mut self) {
        self.failure
            .get_or_insert_with(|| "the queen closed the stream early".to_string());
    }

    /// Ctrl+C: the job was cancelled. The exit code, 130 as for any interrupted command.
    pub fn interrupted(&mut self) -> u8 {
        self.end_line();
        if !self.quiet {
            let _ = writeln!(self.err, "cancelled");
        }
        130
    }

    /// The stream is over: the exit code, or the job's error.
    pub fn finish(&mut self) -> Result<u8, String> {
        self.end_line();
        match self.failure.take() {
            Some(message) => Err(message),
            None => Ok(0),
        }
    }

    fn end_line(&mut self) {
        self.progress.clear(&mut self.err);
        if self.out_tty && !self.answer.is_empty() && !self.answer.ends_with('\n') {
            let _ = writeln!(self.out);
        }
    }

    /// One line on how the answer went (`--verbose`), once `end` came.
    pub fn summary(&self) -> Option<String> {
        let end = self.end.as_ref()?;
        let rate =
            crate::protocol::decode_rate(end.tokens_out, end.decode_time_ms, end.figures.as_ref())
                .map_or("-".to_string(), |r| format!("{r:.1}"));
        let stop = serde_json::to_value(end.stop_reason)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let mut line = format!(
            "prompt {} tokens ({} cached), {} tokens out, {rate} tokens/s, stopped: {stop}",
            self.prompt_tokens, end.cached_tokens, end.tokens_out
        );
        if let Some(f) = &end.figures {
            line.push_str(&format!(
                ", first token after {} ms, hive {}, worker {}",
                f.time_to_first_token_ms, f.hive, f.worker
            ));
        }
        Some(line)
    }
}

/// Download and loading progress: a bar redrawn in place on a terminal, a
/// plain line every 10% otherwise.
pub struct Progress {
    quiet: bool,
    tty: bool,
    /// A bar is on screen, to be erased before anything else is written.
    drawn: bool,
    /// The last line written off a terminal: what, and which 10% step.
    last_step: Option<(String, u64)>,
}

impl Progress {
    pub fn new(quiet: bool, tty: bool) -> Progress {
        Progress {
            quiet,
            tty,
            drawn: false,
            last_step: None,
        }
    }

    fn show(&mut self, err: &mut impl Write, what: &str, done: u64, total: u64, detail: String) {
        if self.quiet || total == 0 {
            return;
        }
        let pct = (done * 100 / total).min(100);
        if self.tty {
            let filled = (pct / 5) as usize;
            let _ = write!(
                err,
                "\r{what} [{}{}] {pct:>3}% {detail}\x1b[K",
                "#".repeat(filled),
                "-".repeat(20 - filled)
            );
            self.drawn = true;
        } else {
            let step = pct / 10;
            if self.last_step.as_ref() != Some(&(what.to_string(), step)) {
                self.last_step = Some((what.to_string(), step));
                let _ = writeln!(err, "{what} {pct}% {detail}");
            }
        }
    }

    pub fn download(&mut self, err: &mut impl Write, e: &DownloadEvent) {
        if let DownloadEvent::Downloading {
            bytes_downloaded,
            bytes_total,
            speed_mbps,
        } = e
        {
            let detail = format!(
                "{}/{} MB {speed_mbps:.0} Mbit/s",
                bytes_downloaded >> 20,
                bytes_total >> 20
            );
            self.show(err, "downloading", *bytes_downloaded, *bytes_total, detail);
        }
    }

    pub fn loading(&mut self, err: &mut impl Write, e: &LoadingEvent) {
        match e {
            LoadingEvent::LoadingToVram {
                layers_loaded,
                layers_total,
                ..
            }
            | LoadingEvent::LoadingToRam {
                layers_loaded,
                layers_total,
                ..
            } => {
                let detail = format!("{layers_loaded}/{layers_total} layers");
                let (done, total) = (u64::from(*layers_loaded), u64::from(*layers_total));
                self.show(err, "loading", done, total, detail);
            }
            LoadingEvent::Ready | LoadingEvent::Failed { .. } => self.clear(err),
        }
    }

    pub fn clear(&mut self, err: &mut impl Write) {
        if self.drawn {
            let _ = write!(err, "\r\x1b[K");
            self.drawn = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shows `events` (then `[DONE]`, unless `closed_early`): stdout, stderr, outcome.
    fn show(events: &[&str], quiet: bool, tty: bool) -> (String, String, Result<u8, String>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut view = JobView::new(&mut out, &mut err, quiet, tty, true);
        for e in events {
            assert_eq!(view.event(e), Next::Read);
        }
        let result = view.finish();
        drop(view);
        let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
        (text(out), text(err), result)
    }

    const NARRATION: &str =
        r#"{"type":"narration","actor":"queen","action":"spawn","human":"starting a worker"}"#;

    #[test]
    fn tokens_go_to_stdout_narration_to_stderr_and_the_answer_ends_its_line() {
        let (out, err, result) = show(
            &[
                NARRATION,
                r#"{"type":"token","t":"Once","i":0}"#,
                r#"{"type":"token","t":" upon","i":1}"#,
                r#"{"type":"end","tokens_out":2,"decode_time_ms":5,"stop_reason":"max_tokens"}"#,
            ],
            false,
            false,
        );
        assert_eq!(out, "Once upon\n");
        assert_eq!(err, "[queen] starting a worker\n");
        assert_eq!(result, Ok(0));
    }

    #[test]
    fn off_a_terminal_stdout_is_exactly_the_text_and_the_summary_has_the_figures() {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut view = JobView::new(&mut out, &mut err, false, false, false);
        for e in [
            r#"{"type":"started","job_id":"j","model":"m","started_at":"","prompt_tokens":31}"#,
            r#"{"type":"token","t":"Paris","i":0}"#,
            r#"{"type":"end","tokens_out":4,"decode_time_ms":50,"stop_reason":"eos","cached_tokens":30,"figures":{"hive":"mac","worker":"worker-1","time_to_first_token_ms":95}}"#,
        ] {
            view.event(e);
        }
        assert_eq!(view.finish(), Ok(0));
        assert_eq!(
            view.summary().as_deref(),
            Some("prompt 31 tokens (30 cached), 4 tokens out, 80.0 tokens/s, stopped: eos, first token after 95 ms, hive mac, worker worker-1")
        );
        assert_eq!(view.answer, "Paris");
        drop(view);
        assert_eq!(String::from_utf8(out).unwrap(), "Paris");
    }

    #[test]
    fn after_a_failover_the_rate_is_the_last_workers_tokens_over_its_time() {
        // 89 tokens in the job, 2 of them from the worker that took over, in 20 ms:
        // 100 tokens/s, not 4,450.
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut view = JobView::new(&mut out, &mut err, false, false, false);
        view.event(r#"{"type":"end","tokens_out":89,"decode_time_ms":20,"stop_reason":"max_tokens","figures":{"hive":"h","worker":"w","time_to_first_token_ms":9,"decoded_tokens":2}}"#);
        let summary = view.summary().expect("a summary");
        assert!(
            summary.contains("89 tokens out, 100.0 tokens/s"),
            "{summary}"
        );
    }

    #[test]
    fn an_error_event_fails_the_command_with_its_message_and_code() {
        let (out, _, result) = show(
            &[r#"{"type":"error","code":"CONTEXT_OVERFLOW","message":"prompt too long"}"#],
            false,
            false,
        );
        assert_eq!(out, "");
        assert_eq!(result, Err("prompt too long (CONTEXT_OVERFLOW)".into()));
    }

    #[test]
    fn quiet_leaves_stderr_empty_and_unknown_events_are_skipped() {
        let (out, err, result) = show(
            &[
                NARRATION,
                r#"{"type":"from_the_future"}"#,
                r#"{"type":"token","t":"x\n","i":0}"#,
            ],
            true,
            false,
        );
        assert_eq!((out.as_str(), err.as_str(), result), ("x\n", "", Ok(0)));
    }

    #[test]
    fn a_stream_cut_short_is_an_error() {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut view = JobView::new(&mut out, &mut err, false, false, true);
        view.closed_early();
        assert_eq!(
            view.finish(),
            Err("the queen closed the stream early".into())
        );
    }

    #[test]
    fn progress_off_a_terminal_is_one_line_per_tenth() {
        let loading = |n| {
            format!(
                r#"{{"type":"loading","stage":"loading_to_ram","layers_loaded":{n},"layers_total":30,"ram_mb":1}}"#
            )
        };
        let events: Vec<String> = [1, 2, 3, 15, 30].into_iter().map(loading).collect();
        let refs: Vec<&str> = events.iter().map(String::as_str).collect();
        let (_, err, _) = show(&refs, false, false);
        assert_eq!(
            err,
            "loading 3% 1/30 layers\nloading 10% 3/30 layers\nloading 50% 15/30 layers\nloading 100% 30/30 layers\n"
        );
    }

    #[test]
    fn a_bar_on_a_terminal_is_erased_before_the_first_token() {
        let (out, err, _) = show(
            &[
                r#"{"type":"download","stage":"downloading","bytes_downloaded":50,"bytes_total":100,"speed_mbps":8.0}"#,
                r#"{"type":"token","t":"hi","i":0}"#,
            ],
            false,
            true,
        );
        assert_eq!(out, "hi\n");
        assert!(
            err.starts_with("\rdownloading [##########----------]  50%"),
            "{err:?}"
        );
        assert!(err.ends_with("\r\x1b[K"), "{err:?}");
    }

    #[test]
    fn a_closed_stdout_stops_reading() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut view = JobView::new(Closed, Vec::new(), false, false, true);
        assert_eq!(
            view.event(r#"{"type":"token","t":"hi","i":0}"#),
            Next::StdoutClosed
        );
    }
}
