//! The keeper's command line: every subcommand and flag (argh). What argh
//! does not do — options anywhere, `-h`, "did you mean" — is `crate::cli`'s.

use argh::FromArgs;
use std::path::PathBuf;

/// Where the keeper finds the queen without a flag (DESIGN.md §1).
pub const DEFAULT_QUEEN: &str = "http://127.0.0.1:8500";

/// The options every keeper command takes, wherever they are written; each
/// takes a value.
pub const GLOBAL_OPTIONS: &[&str] = &["--queen-url", "--token-file"];

/// Commands with an option of a global option's name, which means their own
/// (`hive add --token-file` is the hive's token, not the queen's).
pub const OWN_OPTIONS: &[(&[&str], &str)] = &[(&["hive", "add"], "--token-file")];

/// The rbee command line: run inference and manage the cluster.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "keeper", help_triggers("-h", "--help"))]
pub struct Args {
    /// the queen to talk to (default $RBEE_QUEEN_URL, else the config file's, else
    /// http://127.0.0.1:8500)
    #[argh(option)]
    pub queen_url: Option<String>,
    /// file holding the shared bearer token (else RBEE_TOKEN, else the config file's)
    #[argh(option)]
    pub token_file: Option<PathBuf>,
    #[argh(subcommand)]
    pub command: Command,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Command {
    Run(Run),
    Infer(Infer),
    Pull(Pull),
    List(List),
    Ps(Ps),
    Stop(Stop),
    Status(StatusCmd),
    Hive(HiveCmd),
    Models(ModelsCmd),
    Workers(WorkersCmd),
    Queen(QueenCmd),
    Config(ConfigCmd),
    Keys(KeysCmd),
    JoinToken(JoinTokenCmd),
    Alias(AliasCmd),
}

/// Give a model a short name that every command and API accepts, e.g.
/// `alias smollm2 hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1`;
/// with no arguments, list the aliases
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "alias", help_triggers("-h", "--help"))]
pub struct AliasCmd {
    /// NAME MODEL: the short name, and the model it stands for (a catalog
    /// name, NAME:TAG, hf:ORG/REPO[:QUANT], …)
    #[argh(positional)]
    pub words: Vec<String>,
    /// remove the alias NAME
    #[argh(switch)]
    pub remove: bool,
    /// print the list as JSON
    #[argh(switch)]
    pub json: bool,
}

/// Show the cluster: hives and their memory, workers, models, jobs
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "status", help_triggers("-h", "--help"))]
pub struct StatusCmd {
    /// print a link that opens the queen's status page in a browser, logged in
    #[argh(switch)]
    pub web: bool,
}

/// Answer a prompt with a model, or chat with it (no prompt, on a terminal).
/// The prompt is the words, else --prompt, else stdin when piped or `-`;
/// options may come before or after the words, and `--` ends them.
#[derive(FromArgs, Debug, Default)]
#[argh(subcommand, name = "infer", help_triggers("-h", "--help"))]
pub struct Infer {
    /// the model: hf:ORG/REPO[:QUANT], a .gguf path, or a catalog name
    /// (default: the config file's `model`)
    #[argh(option, short = 'm')]
    pub model: Option<String>,
    /// the prompt (instead of words)
    #[argh(option, short = 'p')]
    pub prompt: Option<String>,
    /// a system message before the prompt
    #[argh(option)]
    pub system: Option<String>,
    /// send the prompt as plain text, without the model's chat template
    #[argh(switch)]
    pub raw: bool,
    /// answer with JSON valid against the JSON schema in this file
    #[argh(option)]
    pub json_schema: Option<PathBuf>,
    /// the hive to run on (default: any registered hive, else this machine)
    #[argh(option)]
    pub node: Option<String>,
    /// tokens to generate at most
    #[argh(option, short = 'n')]
    pub max_tokens: Option<i64>,
    /// sampling temperature (0 = greedy)
    #[argh(option, short = 't')]
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
    /// nothing on stderr but a final error
    #[argh(switch, short = 'q')]
    pub quiet: bool,
    /// after the answer, a summary on stderr: tokens, speed, stop reason, where it ran
    #[argh(switch, short = 'v')]
    pub verbose: bool,
    /// stop, on exit, whatever this call started
    #[argh(switch)]
    pub ephemeral: bool,
    /// read the prompt from stdin (also written `-`), after any words
    #[argh(switch)]
    pub stdin: bool,
    /// the prompt, as words
    #[argh(positional)]
    pub words: Vec<String>,
}

/// `run MODEL [PROMPT…]`: `infer` with the model first, as Ollama users type it.
#[derive(Debug)]
pub struct Run(pub Infer);

impl argh::SubCommand for Run {
    const COMMAND: &'static argh::CommandInfo = &argh::CommandInfo {
        name: "run",
        short: &'\0',
        description: "Chat with MODEL, or answer PROMPT: `run MODEL [PROMPT]`, infer's options.",
    };
}

impl FromArgs for Run {
    fn from_args(command_name: &[&str], args: &[&str]) -> Result<Self, argh::EarlyExit> {
        // `--model` is optional for infer, so the model is taken from the words here;
        // infer's help, with the model where `run` takes it.
        let mut infer = Infer::from_args(command_name, args).map_err(|mut e| {
            if e.status.is_ok() {
                e.output = e.output.replacen("[<words...>]", "MODEL [<words...>]", 1);
            }
            e
        })?;
        if infer.model.is_none() {
            if infer.words.is_empty() {
                return Err(argh::EarlyExit {
                    output: "no model: `rbee keeper run MODEL [PROMPT]`".into(),
                    status: Err(()),
                });
            }
            infer.model = Some(infer.words.remove(0));
        }
        Ok(Run(infer))
    }
}

/// Download a model onto a hive (`models download`).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "pull", help_triggers("-h", "--help"))]
pub struct Pull {
    /// the model reference: hf:ORG/REPO[:QUANT], or a .gguf path on the hive
    #[argh(positional)]
    pub model_ref: String,
    /// the hive (default localhost)
    #[argh(option, default = "String::from(\"localhost\")")]
    pub node: String,
}

/// The models every hive has.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list", help_triggers("-h", "--help"))]
pub struct List {
    /// JSON instead of a table
    #[argh(switch)]
    pub json: bool,
}

/// The workers running, on every hive (`workers list`).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "ps", help_triggers("-h", "--help"))]
pub struct Ps {
    /// JSON instead of a table
    #[argh(switch)]
    pub json: bool,
}

/// Stop the workers of a model, or the worker whose id starts with the prefix.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "stop", help_triggers("-h", "--help"))]
pub struct Stop {
    /// a model's catalog name, or the start of a worker id
    #[argh(positional)]
    pub target: String,
}

/// Print the command that joins another machine to this cluster (`rbee hive --join TOKEN`)
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "join-token", help_triggers("-h", "--help"))]
pub struct JoinTokenCmd {
    /// how long it may be used, e.g. 30m, 1h, 7d (default 1h)
    #[argh(option)]
    pub expires: Option<String>,
    /// how many machines may join with it (default 1)
    #[argh(option)]
    pub uses: Option<u32>,
    /// leave the queen's addresses out: the new machine finds the queen on
    /// the LAN (mDNS) by its certificate
    #[argh(switch)]
    pub no_addresses: bool,
}

/// Make, list and revoke client keys (for people and programs that use the queen).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "keys", help_triggers("-h", "--help"))]
pub struct KeysCmd {
    #[argh(subcommand)]
    pub action: KeysAction,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum KeysAction {
    Add(KeysAdd),
    List(KeysList),
    Revoke(KeysRevoke),
}

/// Make a key; it is printed this once.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "add", help_triggers("-h", "--help"))]
pub struct KeysAdd {
    /// the key's name (who or what uses it)
    #[argh(positional)]
    pub name: String,
    /// use (inference, models, embeddings; the default) or admin (also hives, workers, keys)
    #[argh(option, default = "String::from(\"use\")")]
    pub scope: String,
    /// how long it is good for, e.g. 30d or 12h (default: until revoked)
    #[argh(option)]
    pub expires: Option<String>,
    /// requests it may make, e.g. 60/min (default: no limit)
    #[argh(option)]
    pub rate: Option<String>,
    /// requests it may hold open at once, streams included (default: no limit)
    #[argh(option)]
    pub streams: Option<u32>,
}

/// List the keys: name, scope, created, last used, requests, tokens.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list", help_triggers("-h", "--help"))]
pub struct KeysList {
    /// JSON instead of a table
    #[argh(switch)]
    pub json: bool,
}

/// Revoke a key: refused from now on.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "revoke", help_triggers("-h", "--help"))]
pub struct KeysRevoke {
    /// the key's name
    #[argh(positional)]
    pub name: String,
}

/// Register, list and forget hives.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "hive", help_triggers("-h", "--help"))]
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
#[argh(subcommand, name = "add", help_triggers("-h", "--help"))]
pub struct HiveAdd {
    /// the hive's name, used with --node
    #[argh(positional)]
    pub name: String,
    /// where it listens: https://mac.home.arpa:8080 (http:// on this machine only)
    #[argh(option)]
    pub url: String,
    /// file holding the hive's token (the queen's is `--token-file` before `hive`)
    #[argh(option)]
    pub token_file: Option<PathBuf>,
    /// the certificate fingerprint the hive must present (`rbee hive
    /// --show-identity` there); absent, the one it presents is pinned and shown
    #[argh(option)]
    pub fingerprint: Option<String>,
}

/// List hives and whether they answer.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list", help_triggers("-h", "--help"))]
pub struct HiveList {
    /// JSON instead of a table
    #[argh(switch)]
    pub json: bool,
}

/// Forget a hive.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "remove", help_triggers("-h", "--help"))]
pub struct HiveRemove {
    /// the hive's name
    #[argh(positional)]
    pub name: String,
}

/// The models on a hive.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "models", help_triggers("-h", "--help"))]
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
    Set(ModelsSet),
}

/// List a hive's models.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list", help_triggers("-h", "--help"))]
pub struct ModelsList {
    /// the hive (default localhost)
    #[argh(option, default = "String::from(\"localhost\")")]
    pub node: String,
    /// JSON instead of a table
    #[argh(switch)]
    pub json: bool,
}

/// Have a hive download a model.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "download", help_triggers("-h", "--help"))]
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
#[argh(subcommand, name = "remove", help_triggers("-h", "--help"))]
pub struct ModelsRemove {
    /// the catalog name
    #[argh(positional)]
    pub name: String,
    /// the hive (default localhost)
    #[argh(option, default = "String::from(\"localhost\")")]
    pub node: String,
}

/// Set how a model's workers start on a hive: context, slots, KV cache type.
/// Its memory estimate, placement and every new worker of it follow; a
/// worker already running keeps what it started with.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "set", help_triggers("-h", "--help"))]
pub struct ModelsSet {
    /// the catalog name
    #[argh(positional)]
    pub name: String,
    /// the hive (default localhost)
    #[argh(option, default = "String::from(\"localhost\")")]
    pub node: String,
    /// context of each slot, in tokens
    #[argh(option)]
    pub ctx: Option<u32>,
    /// requests a worker serves at once, each with its own context
    #[argh(option)]
    pub slots: Option<u32>,
    /// the KV cache's cells: f16, q8_0 (about half the memory) or q4_0
    #[argh(option, from_str_fn(crate::protocol::CacheType::parse))]
    pub cache_type: Option<crate::protocol::CacheType>,
    /// back to the hive's defaults (then the options given, if any)
    #[argh(switch)]
    pub reset: bool,
}

/// Remove a hive's partial downloads (those not running), freeing their space.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "clean", help_triggers("-h", "--help"))]
pub struct ModelsClean {
    /// the hive (default localhost)
    #[argh(option, default = "String::from(\"localhost\")")]
    pub node: String,
}

/// The workers of every hive.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "workers", help_triggers("-h", "--help"))]
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
#[argh(subcommand, name = "list", help_triggers("-h", "--help"))]
pub struct WorkersList {
    /// JSON instead of a table
    #[argh(switch)]
    pub json: bool,
}

/// Stop a worker.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "stop", help_triggers("-h", "--help"))]
pub struct WorkersStop {
    /// the worker's id, or its start
    #[argh(positional)]
    pub id: String,
}

/// Start, stop or check the queen: `queen start|stop|status`.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "queen", help_triggers("-h", "--help"))]
pub struct QueenCmd {
    /// start, stop or status
    #[argh(positional)]
    pub action: String,
}

/// What the keeper remembers: `config set KEY VALUE`, `config get [KEY]`,
/// `config unset KEY`; keys: queen-url, token-file, model.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "config", help_triggers("-h", "--help"))]
pub struct ConfigCmd {
    /// set, get or unset
    #[argh(positional)]
    pub action: String,
    /// the key, and for set its value
    #[argh(positional)]
    pub words: Vec<String>,
}

impl Command {
    /// The inference this command runs, if it is one.
    pub fn infer(&self) -> Option<&Infer> {
        match self {
            Command::Infer(i) | Command::Run(Run(i)) => Some(i),
            _ => None,
        }
    }
}

impl Args {
    /// The queen's URL: `--queen-url`, else `$RBEE_QUEEN_URL` (`env`), else
    /// the config file's (`config`), else the default; as [`super::queen::queen_url`] reads it.
    pub fn queen_url(&self, env: Option<String>, config: Option<&str>) -> Result<String, String> {
        let given = self
            .queen_url
            .clone()
            .or(env.filter(|u| !u.trim().is_empty()))
            .or(config.map(str::to_string))
            .unwrap_or_else(|| DEFAULT_QUEEN.into());
        super::queen::queen_url(&given)
    }

    /// Whether only a final error may reach stderr (`infer -q`).
    pub fn quiet(&self) -> bool {
        self.command.infer().is_some_and(|i| i.quiet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Args {
        Args::from_args(&["keeper"], argv).unwrap_or_else(|e| panic!("{argv:?}: {}", e.output))
    }

    fn infer_of(args: &Args) -> &Infer {
        args.command
            .infer()
            .unwrap_or_else(|| panic!("not an inference: {args:?}"))
    }

    #[test]
    fn the_flag_beats_the_environment_beats_the_config_file() {
        let env = || Some("http://env:1/".to_string());
        let flag = parse(&["--queen-url", "http://flag:2/", "workers", "list"]);
        // Beyond this machine, a queen is reached over TLS.
        assert_eq!(
            flag.queen_url(env(), Some("http://conf:3")).as_deref(),
            Ok("https://flag:2")
        );
        let none = parse(&["workers", "list"]);
        assert_eq!(
            none.queen_url(env(), Some("http://conf:3")).as_deref(),
            Ok("https://env:1")
        );
        assert_eq!(
            none.queen_url(Some(String::new()), Some("http://127.0.0.1:3/"))
                .as_deref(),
            Ok("http://127.0.0.1:3")
        );
        assert_eq!(none.queen_url(None, None).as_deref(), Ok(DEFAULT_QUEEN));
    }

    #[test]
    fn options_after_the_words_are_options() {
        let args = parse(&[
            "infer",
            "-m",
            "m",
            "The",
            "capital",
            "--max-tokens",
            "5",
            "is",
            "-q",
            "--stop",
            "a",
        ]);
        let i = infer_of(&args);
        assert_eq!(i.words, ["The", "capital", "is"]);
        assert_eq!(i.max_tokens, Some(5));
        assert_eq!(i.stop, ["a"]);
        assert!(args.quiet());
        // `--` ends the options: the rest is prompt, dashes and all.
        let args = parse(&["infer", "-m", "m", "--", "--max-tokens", "-q"]);
        assert_eq!(infer_of(&args).words, ["--max-tokens", "-q"]);
        assert!(!args.quiet());
    }

    #[test]
    fn help_is_a_word_of_the_prompt_not_a_request_for_help() {
        let args = parse(&["infer", "-m", "m", "help", "me"]);
        assert_eq!(infer_of(&args).words, ["help", "me"]);
        let help = Args::from_args(&["keeper"], &["infer", "-h"]).unwrap_err();
        assert!(help.status.is_ok() && help.output.contains("--max-tokens"));
    }

    #[test]
    fn run_takes_the_model_first() {
        let args = parse(&[
            "run",
            "smollm",
            "why",
            "--temperature",
            "0",
            "is",
            "the",
            "sky",
            "blue",
        ]);
        let i = infer_of(&args);
        assert_eq!(i.model.as_deref(), Some("smollm"));
        assert_eq!(i.words, ["why", "is", "the", "sky", "blue"]);
        assert_eq!(i.temperature, Some(0.0));
        let chat = parse(&["run", "smollm"]);
        assert!(infer_of(&chat).words.is_empty());
        assert!(Args::from_args(&["keeper"], &["run"]).is_err());
        let help = Args::from_args(&["keeper"], &["run", "--help"]).unwrap_err();
        assert!(
            help.output.starts_with("Usage: keeper run")
                && help.output.contains(" MODEL [<words...>]"),
            "{}",
            help.output
        );
    }

    #[test]
    fn infer_without_a_model_is_left_to_the_config_file() {
        assert!(infer_of(&parse(&["infer", "hi"])).model.is_none());
    }
}
