//! `rbee keeper`: the CLI a person types. Tokens go to stdout and nothing else
//! does; narration and progress go to stderr.
//!
//! Every command talks to the queen. If no queen answers, the keeper starts
//! one in the background ("queen is asleep, waking queen") and leaves it
//! running, so the next call is warm.
//!
//! `args` holds the command line, `queen` the calls to the queen and waking
//! it, `infer` a job and its stream, `render` how a stream is shown, and
//! `manage` the management commands, `status` the cluster at a glance.

mod args;
mod infer;
mod manage;
mod queen;
mod render;
mod status;

pub use args::*;

/// Runs a keeper command; the exit code on success (0, or 130 after Ctrl+C).
pub async fn run(args: Args) -> Result<u8, String> {
    let token = crate::http::Auth::load(args.token_file.as_deref())?
        .token()
        .map(str::to_string);
    let queen = queen::Queen {
        url: args.queen_url(std::env::var("RBEE_QUEEN_URL").ok()),
        token,
        quiet: args.quiet(),
    };
    match args.command {
        Command::Infer(i) => infer::infer(&queen, i).await,
        other => manage::manage(&queen, other).await.map(|()| 0),
    }
}
