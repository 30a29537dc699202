//! `rbee keeper`: the CLI a person types. Tokens go to stdout and nothing else
//! does; narration and progress go to stderr.
//!
//! Every command talks to the queen. If no queen answers, the keeper starts
//! one in the background ("queen is asleep, waking queen") and leaves it
//! running, so the next call is warm.

use crate::http::client;
use crate::http::sse::Frame;
use crate::protocol::{
    AddHive, ClusterEvent, DownloadEvent, DownloadRequest, DownloadStarted, Health, HiveStatus,
    HiveWorker, InferenceEvent, JobCreated, JobEvent, JobRequest, LoadingEvent, ModelEntry,
    SamplingParams,
};
use argh::FromArgs;
use hyper::Method;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

const DEFAULT_QUEEN: &str = "http://127.0.0.1:8500";

/// The rbee command line: run inference and manage the cluster.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "keeper")]
pub struct Args {
    /// the queen to talk to (default $RBEE_QUEEN_URL, else http://127.0.0.1:8500)
    #[argh(option)]
    pub queen_url: Option<String>,
    /// file holding the shared bearer token (else RBEE_TOKEN)
    #[argh(option)]
    pub token_file: Option<PathBuf>,
    #[argh(subcommand)]
    pub command: Command,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Command {
    Infer(Infer),
    Hive(HiveCmd),
    Models(ModelsCmd),
    Workers(WorkersCmd),
    Queen(QueenCmd),
}

/// Stream a completion to stdout.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "infer")]
pub struct Infer {
    /// the prompt (else the words after the options, else stdin when piped or `-`)
    #[argh(option)]
    pub prompt: Option<String>,
    /// the hive to run on (default: any registered hive, else this machine)
    #[argh(option)]
    pub node: Option<String>,
    /// the model: hf:ORG/REPO[:QUANT], a .gguf path, or a catalog name
    #[argh(option)]
    pub model: String,
    /// tokens to generate at most
    #[argh(option)]
    pub max_tokens: Option<i64>,
    /// sampling temperature (0 = greedy)
    #[argh(option)]
    pub temperature: Option<f32>,
    /// nucleus sampling
    #[argh(option)]
    pub top_p: Option<f32>,
    /// top-k sampling (0 = off)
    #[argh(option)]
    pub top_k: Option<i32>,
    /// random seed
    #[argh(option)]
    pub seed: Option<u32>,
    /// stop sequence (repeatable)
    #[argh(option)]
    pub stop: Vec<String>,
    /// the queen to talk to
    #[argh(option)]
    pub queen_url: Option<String>,
    /// nothing on stderr but a final error
    #[argh(switch, short = 'q')]
    pub quiet: bool,
    /// stop, on exit, whatever this call started
    #[argh(switch)]
    pub ephemeral: bool,
    /// read the prompt from stdin (also written `-`)
    #[argh(switch)]
    pub stdin: bool,
    /// the prompt, as words
    #[argh(positional, greedy)]
    pub words: Vec<String>,
}

/// Register, list and forget hives.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "hive")]
pub struct HiveCmd {
    #[argh(subcommand)]
    pub action: HiveAction,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum HiveAction {
    Add(HiveAdd),
    List(HiveList),
    Remove(HiveRemove),
}

/// Register a hive with the queen.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "add")]
pub struct HiveAdd {
    /// the hive's name, used with --node
    #[argh(positional)]
    pub name: String,
    /// where it listens, e.g. http://mac.home.arpa:8080
    #[argh(option)]
    pub url: String,
    /// file holding the hive's token
    #[argh(option)]
    pub token_file: Option<PathBuf>,
}

/// List hives and whether they answer.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list")]
pub struct HiveList {}

/// Forget a hive.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "remove")]
pub struct HiveRemove {
    /// the hive's name
    #[argh(positional)]
    pub name: String,
}

/// The models on a hive.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "models")]
pub struct ModelsCmd {
    #[argh(subcommand)]
    pub action: ModelsAction,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum ModelsAction {
    List(ModelsList),
    Download(ModelsDownload),
    Remove(ModelsRemove),
}

/// List a hive's models.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list")]
pub struct ModelsList {
    /// the hive (default localhost)
    #[argh(option, default = "String::from(\"localhost\")")]
    pub node: String,
}

/// Have a hive download a model.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "download")]
pub struct ModelsDownload {
    /// the model reference
    #[argh(positional)]
    pub model_ref: String,
    /// the hive (default localhost)
    #[argh(option, default = "String::from(\"localhost\")")]
    pub node: String,
}

/// Remove a model from a hive.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "remove")]
pub struct ModelsRemove {
    /// the catalog name
    #[argh(positional)]
    pub name: String,
    /// the hive (default localhost)
    #[argh(option, default = "String::from(\"localhost\")")]
    pub node: String,
}

/// The workers of every hive.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "workers")]
pub struct WorkersCmd {
    #[argh(subcommand)]
    pub action: WorkersAction,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum WorkersAction {
    List(WorkersList),
    Stop(WorkersStop),
}

/// List workers.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list")]
pub struct WorkersList {}

/// Stop a worker.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "stop")]
pub struct WorkersStop {
    /// the worker's id
    #[argh(positional)]
    pub id: String,
}

/// Start, stop or check the queen.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "queen")]
pub struct QueenCmd {
    /// start, stop or status
    #[argh(positional)]
    pub action: String,
}

/// Where the keeper is talking to, and how it reports.
struct Ctx {
    queen: String,
    token: Option<String>,
    quiet: bool,
}

impl Ctx {
    fn say(&self, line: &str) {
        if !self.quiet {
            eprintln!("{line}");
        }
    }

    async fn queen_alive(&self) -> bool {
        let url = format!("{}/health", self.queen);
        matches!(client::get::<Health>(&url, None).await, Ok(h) if h.role == "queen")
    }

    /// The queen, woken if asleep; true if this call started it.
    async fn ensure_queen(&self) -> Result<bool, String> {
        if self.queen_alive().await {
            return Ok(false);
        }
        let uri: hyper::Uri = self
            .queen
            .parse()
            .map_err(|e| format!("bad queen URL {}: {e}", self.queen))?;
        let host = uri.host().unwrap_or("127.0.0.1");
        if !(host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback()))
        {
            return Err(format!("the queen at {} is not answering", self.queen));
        }
        self.say("queen is asleep, waking queen");
        let data_dir = crate::data_dir(None);
        std::fs::create_dir_all(&data_dir)
            .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
        let log_path = data_dir.join("queen.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
        let mut command = std::process::Command::new(exe);
        command
            .arg("queen")
            .args(["--port", &uri.port_u16().unwrap_or(8500).to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        let mut child = crate::process::spawn_detached(command)
            .map_err(|e| format!("cannot start a queen: {e}"))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !self.queen_alive().await {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the queen exited ({status}); see {}",
                    log_path.display()
                ));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "the queen did not answer within 30s; see {}",
                    log_path.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.say(&format!(
            "queen is up at {} (log: {})",
            self.queen,
            log_path.display()
        ));
        Ok(true)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.queen)
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<T, String> {
        client::call(method, &self.url(path), self.token.as_deref(), body)
            .await
            .map_err(|e| e.to_string())
    }

    async fn stop_queen(&self) -> Result<(), String> {
        if !self.queen_alive().await {
            return Ok(());
        }
        let _: serde_json::Value = self
            .call(Method::POST, "/v1/admin/shutdown", None::<&()>)
            .await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
        while self.queen_alive().await {
            if tokio::time::Instant::now() > deadline {
                return Err("the queen did not stop within 40s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }
}

/// Runs a keeper command; the exit code on success (0, or 130 after Ctrl+C).
pub async fn run(args: Args) -> Result<u8, String> {
    let token = crate::http::Auth::load(args.token_file.as_deref())?
        .token()
        .map(str::to_string);
    let infer_url = match &args.command {
        Command::Infer(i) => i.queen_url.clone(),
        _ => None,
    };
    let queen = infer_url
        .or(args.queen_url)
        .or_else(|| {
            std::env::var("RBEE_QUEEN_URL")
                .ok()
                .filter(|u| !u.is_empty())
        })
        .unwrap_or_else(|| DEFAULT_QUEEN.into())
        .trim_end_matches('/')
        .to_string();
    let quiet = matches!(&args.command, Command::Infer(i) if i.quiet);
    let ctx = Ctx {
        queen,
        token,
        quiet,
    };
    match args.command {
        Command::Infer(i) => infer(&ctx, i).await,
        Command::Queen(q) => queen_cmd(&ctx, &q.action).await.map(|()| 0),
        other => {
            ctx.ensure_queen().await?;
            manage(&ctx, other).await.map(|()| 0)
        }
    }
}

async fn queen_cmd(ctx: &Ctx, action: &str) -> Result<(), String> {
    match action {
        "start" => {
            if !ctx.ensure_queen().await? {
                println!("queen already running at {}", ctx.queen);
            }
            Ok(())
        }
        "stop" => {
            let was = ctx.queen_alive().await;
            ctx.stop_queen().await?;
            println!(
                "{}",
                if was {
                    "queen stopped"
                } else {
                    "no queen was running"
                }
            );
            Ok(())
        }
        "status" => {
            if !ctx.queen_alive().await {
                println!("queen\tasleep\t{}", ctx.queen);
                return Ok(());
            }
            println!("queen\talive\t{}", ctx.queen);
            let hives: Vec<HiveStatus> = ctx.call(Method::GET, "/v1/hives", None::<&()>).await?;
            for h in hives {
                println!("hive\t{}\t{}\t{}", h.name, h.status, h.url);
            }
            Ok(())
        }
        other => Err(format!(
            "unknown queen action {other:?}: use start, stop or status"
        )),
    }
}

async fn manage(ctx: &Ctx, command: Command) -> Result<(), String> {
    match command {
        Command::Hive(HiveCmd {
            action: HiveAction::Add(a),
        }) => {
            let token = match &a.token_file {
                Some(path) => Some(
                    std::fs::read_to_string(path)
                        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                        .trim()
                        .to_string(),
                ),
                None => None,
            };
            let body = AddHive {
                name: a.name,
                url: a.url,
                token,
            };
            let h: HiveStatus = ctx.call(Method::POST, "/v1/hives", Some(&body)).await?;
            println!("{}\t{}\t{}", h.name, h.status, h.url);
        }
        Command::Hive(HiveCmd {
            action: HiveAction::List(_),
        }) => {
            let hives: Vec<HiveStatus> = ctx.call(Method::GET, "/v1/hives", None::<&()>).await?;
            for h in hives {
                let managed = if h.managed { "managed" } else { "registered" };
                println!(
                    "{}\t{}\t{}\t{managed}\t{}",
                    h.name,
                    h.status,
                    h.url,
                    h.last_seen.unwrap_or_default()
                );
            }
        }
        Command::Hive(HiveCmd {
            action: HiveAction::Remove(r),
        }) => {
            let _: serde_json::Value = ctx
                .call(
                    Method::DELETE,
                    &format!("/v1/hives/{}", r.name),
                    None::<&()>,
                )
                .await?;
            println!("removed {}", r.name);
        }
        Command::Models(ModelsCmd {
            action: ModelsAction::List(l),
        }) => {
            let models: Vec<ModelEntry> = ctx
                .call(
                    Method::GET,
                    &format!("/v1/hives/{}/models", l.node),
                    None::<&()>,
                )
                .await?;
            for m in models {
                println!(
                    "{}\t{}\t{}\t{} MB\t{}\t{}",
                    m.name,
                    m.quantization,
                    m.architecture,
                    m.size >> 20,
                    m.model_ref,
                    m.path
                );
            }
        }
        Command::Models(ModelsCmd {
            action: ModelsAction::Download(d),
        }) => {
            let body = DownloadRequest {
                model_ref: d.model_ref.clone(),
            };
            let started: DownloadStarted = ctx
                .call(
                    Method::POST,
                    &format!("/v1/hives/{}/models/download", d.node),
                    Some(&body),
                )
                .await?;
            let url = ctx.url(&format!(
                "/v1/hives/{}/models/download/progress?id={}",
                d.node, started.download_id
            ));
            let mut stream = client::stream(&url, ctx.token.as_deref(), None::<&()>)
                .await
                .map_err(|e| e.to_string())?;
            let mut progress = Progress::new(false);
            while let Some(Frame::Data(data)) = stream.next().await {
                match serde_json::from_str::<DownloadEvent>(&data) {
                    Ok(DownloadEvent::Complete { local_path }) => {
                        progress.clear();
                        println!("{}\t{local_path}", d.model_ref);
                        return Ok(());
                    }
                    Ok(DownloadEvent::Error { message }) => return Err(message),
                    Ok(e) => progress.download(&e),
                    Err(_) => {}
                }
            }
            return Err("the download stream ended early".into());
        }
        Command::Models(ModelsCmd {
            action: ModelsAction::Remove(r),
        }) => {
            let _: serde_json::Value = ctx
                .call(
                    Method::DELETE,
                    &format!("/v1/hives/{}/models/{}", r.node, r.name),
                    None::<&()>,
                )
                .await?;
            println!("removed {}", r.name);
        }
        Command::Workers(WorkersCmd {
            action: WorkersAction::List(_),
        }) => {
            let workers: Vec<HiveWorker> =
                ctx.call(Method::GET, "/v1/workers", None::<&()>).await?;
            for HiveWorker { hive, worker: w } in workers {
                println!(
                    "{}\t{hive}\t{}\t{}\t{}\t{} slots",
                    w.worker_id, w.model, w.state, w.url, w.slots
                );
            }
        }
        Command::Workers(WorkersCmd {
            action: WorkersAction::Stop(st),
        }) => {
            let _: serde_json::Value = ctx
                .call(
                    Method::POST,
                    &format!("/v1/workers/{}/shutdown", st.id),
                    None::<&()>,
                )
                .await?;
            println!("stopping {}", st.id);
        }
        Command::Infer(_) | Command::Queen(_) => {}
    }
    Ok(())
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

async fn infer(ctx: &Ctx, i: Infer) -> Result<u8, String> {
    let prompt = prompt_of(&i)?;
    if prompt.trim().is_empty() {
        return Err("the prompt is empty".into());
    }
    let started_queen = ctx.ensure_queen().await?;
    let result = infer_on_queen(ctx, &i, prompt).await;
    if i.ephemeral && started_queen {
        ctx.say("stopping the queen this call started (--ephemeral)");
        ctx.stop_queen().await?;
    }
    result
}

async fn infer_on_queen(ctx: &Ctx, i: &Infer, prompt: String) -> Result<u8, String> {
    // A relative path means this shell's directory, not the hive's.
    let model = match std::fs::canonicalize(&i.model) {
        Ok(abs) if i.model.to_ascii_lowercase().ends_with(".gguf") => {
            format!("file:{}", abs.display())
        }
        _ => i.model.clone(),
    };
    let req = JobRequest {
        node: i.node.clone(),
        model,
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
    };
    let job: JobCreated = ctx.call(Method::POST, "/v1/jobs", Some(&req)).await?;
    let mut stream = client::stream(&ctx.url(&job.sse_url), ctx.token.as_deref(), None::<&()>)
        .await
        .map_err(|e| e.message)?;
    let mut progress = Progress::new(ctx.quiet);
    let mut stdout = std::io::stdout();
    let mut wrote = false;
    let mut ended_with_newline = true;
    let mut failure = None;
    loop {
        let frame = tokio::select! {
            f = stream.next() => f,
            _ = tokio::signal::ctrl_c() => {
                progress.clear();
                let _: Result<serde_json::Value, _> =
                    ctx.call(Method::DELETE, &format!("/v1/jobs/{}", job.job_id), None::<&()>).await;
                if wrote && !ended_with_newline {
                    println!();
                }
                ctx.say("cancelled");
                return Ok(130);
            }
        };
        let data = match frame {
            Some(Frame::Data(d)) => d,
            Some(Frame::Done) => break,
            None => {
                failure.get_or_insert_with(|| "the queen closed the stream early".to_string());
                break;
            }
        };
        let Ok(event) = serde_json::from_str::<JobEvent>(&data) else {
            continue;
        };
        match event {
            JobEvent::Inference(InferenceEvent::Token { t, .. }) => {
                progress.clear();
                // A closed stdout (`| head`) is the reader's choice, not an error.
                if stdout
                    .write_all(t.as_bytes())
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    return Ok(0);
                }
                wrote = true;
                ended_with_newline = t.ends_with('\n');
            }
            JobEvent::Inference(InferenceEvent::Error { message, code }) => {
                failure = Some(format!("{message} ({code})"));
            }
            JobEvent::Inference(InferenceEvent::Started { .. } | InferenceEvent::End { .. }) => {}
            JobEvent::Cluster(ClusterEvent::Narration { actor, human, .. }) => {
                progress.clear();
                ctx.say(&format!("[{actor}] {human}"));
            }
            JobEvent::Cluster(ClusterEvent::Download(e)) => progress.download(&e),
            JobEvent::Cluster(ClusterEvent::Loading(e)) => progress.loading(&e),
        }
    }
    progress.clear();
    if wrote && !ended_with_newline {
        let _ = writeln!(stdout);
    }
    match failure {
        Some(message) => Err(message),
        None => Ok(0),
    }
}

/// Download and loading progress on stderr: a bar redrawn in place on a
/// terminal, a plain line every 10% otherwise.
struct Progress {
    quiet: bool,
    tty: bool,
    drawn: bool,
    last_step: Option<(String, u64)>,
}

impl Progress {
    fn new(quiet: bool) -> Progress {
        Progress {
            quiet,
            tty: std::io::stderr().is_terminal(),
            drawn: false,
            last_step: None,
        }
    }

    fn show(&mut self, what: &str, done: u64, total: u64, detail: String) {
        if self.quiet || total == 0 {
            return;
        }
        let pct = (done * 100 / total).min(100);
        if self.tty {
            let filled = (pct / 5) as usize;
            eprint!(
                "\r{what} [{}{}] {pct:>3}% {detail}\x1b[K",
                "#".repeat(filled),
                "-".repeat(20 - filled)
            );
            self.drawn = true;
        } else {
            let step = pct / 10;
            if self.last_step.as_ref() != Some(&(what.to_string(), step)) {
                self.last_step = Some((what.to_string(), step));
                eprintln!("{what} {pct}% {detail}");
            }
        }
    }

    fn download(&mut self, e: &DownloadEvent) {
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
            self.show("downloading", *bytes_downloaded, *bytes_total, detail);
        }
    }

    fn loading(&mut self, e: &LoadingEvent) {
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
                self.show(
                    "loading",
                    u64::from(*layers_loaded),
                    u64::from(*layers_total),
                    detail,
                );
            }
            LoadingEvent::Ready | LoadingEvent::Failed { .. } => self.clear(),
        }
    }

    fn clear(&mut self) {
        if self.drawn {
            eprint!("\r\x1b[K");
            self.drawn = false;
        }
    }
}
