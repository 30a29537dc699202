//! The keeper's command line: every subcommand and flag (argh).

use argh::FromArgs;
use std::path::PathBuf;

/// Where the keeper finds the queen without a flag (DESIGN.md §1).
pub const DEFAULT_QUEEN: &str = "http://127.0.0.1:8500";

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
    Status(StatusCmd),
}

/// Show the cluster: hives and their memory, workers, models, jobs
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "status")]
pub struct StatusCmd {
    /// print a link that opens the queen's status page in a browser, logged in
    #[argh(switch)]
    pub web: bool,
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
    Clean(ModelsClean),
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

/// Remove a hive's partial downloads (those not running), freeing their space.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "clean")]
pub struct ModelsClean {
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

impl Args {
    /// The queen's URL: `infer --queen-url`, else `--queen-url`, else
    /// `$RBEE_QUEEN_URL` (passed in as `env`), else the default; no trailing slash.
    pub fn queen_url(&self, env: Option<String>) -> String {
        let infer_url = match &self.command {
            Command::Infer(i) => i.queen_url.clone(),
            _ => None,
        };
        infer_url
            .or_else(|| self.queen_url.clone())
            .or(env.filter(|u| !u.is_empty()))
            .unwrap_or_else(|| DEFAULT_QUEEN.into())
            .trim_end_matches('/')
            .to_string()
    }

    /// Whether only a final error may reach stderr (`infer -q`).
    pub fn quiet(&self) -> bool {
        matches!(&self.command, Command::Infer(i) if i.quiet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Args {
        Args::from_args(&["keeper"], argv).unwrap_or_else(|e| panic!("{argv:?}: {}", e.output))
    }

    #[test]
    fn the_infer_flag_beats_the_global_flag_beats_the_environment() {
        let env = || Some("http://env:1/".to_string());
        let both = parse(&[
            "--queen-url",
            "http://global:2",
            "infer",
            "--model",
            "m",
            "--queen-url",
            "http://infer:3/",
            "hi",
        ]);
        assert_eq!(both.queen_url(env()), "http://infer:3");
        let global = parse(&["--queen-url", "http://global:2/", "workers", "list"]);
        assert_eq!(global.queen_url(env()), "http://global:2");
        let none = parse(&["workers", "list"]);
        assert_eq!(none.queen_url(env()), "http://env:1");
        assert_eq!(none.queen_url(Some(String::new())), DEFAULT_QUEEN);
        assert_eq!(none.queen_url(None), DEFAULT_QUEEN);
    }

    #[test]
    fn words_after_the_options_are_the_prompt() {
        let args = parse(&[
            "infer", "--model", "m", "-q", "--stop", "a", "--stop", "b", "Once", "upon",
        ]);
        let Command::Infer(i) = &args.command else {
            panic!("not infer: {args:?}");
        };
        assert_eq!(i.words, ["Once", "upon"]);
        assert_eq!(i.stop, ["a", "b"]);
        assert!(args.quiet());
    }

    #[test]
    fn infer_needs_a_model() {
        assert!(Args::from_args(&["keeper"], &["infer", "hi"]).is_err());
    }
}
