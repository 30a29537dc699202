//! `rbee keeper`: the CLI a person types. Tokens go to stdout and nothing else
//! does; narration and progress go to stderr.
//!
//! Commands that ask for work talk to the queen, starting one in the
//! background if none answers ("queen is asleep, waking queen") and leaving it
//! running, so the next call is warm; commands that only look never start one.
//!
//! `args` holds the command line, `config` what is remembered between calls,
//! `queen` the calls to the queen and waking it, `infer` a job and its stream,
//! `chat` the interactive chat, `render` how a stream is shown, `table` how
//! lists are, `manage` the management commands and `status` the cluster at a
//! glance.

mod args;
mod chat;
mod config;
mod infer;
mod manage;
mod models;
mod queen;
mod render;
mod status;
mod table;

pub use args::*;

/// Runs a keeper command; the exit code on success (0, 130 after Ctrl+C,
/// 3 from `queen status` when no queen runs).
pub async fn run(args: Args) -> Result<u8, String> {
    let mut config = config::Config::load(&config::path())?;
    // The token: --token-file, else RBEE_TOKEN, else the config file's token file.
    let token_file = args.token_file.clone().or_else(|| {
        std::env::var_os("RBEE_TOKEN")
            .is_none()
            .then(|| config.token_file.clone())
            .flatten()
    });
    let token = crate::http::Auth::load(token_file.as_deref())?
        .token()
        .map(str::to_string);
    let queen = queen::Queen {
        url: args.queen_url(
            std::env::var("RBEE_QUEEN_URL").ok(),
            config.queen_url.as_deref(),
        )?,
        token,
        quiet: args.quiet(),
    };
    queen::trust(&queen.url, &mut config, &config::path()).await?;
    match args.command {
        Command::Infer(i) | Command::Run(Run(i)) => infer::infer(&queen, i, config.model).await,
        other => manage::manage(&queen, other).await,
    }
}
