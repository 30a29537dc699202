//! `rbee ROLE …`: parse the command line, set up logging, run the role.

use argh::FromArgs;
use std::process::ExitCode;

/// rbee: one LLM inference cluster from the machines you have.
#[derive(FromArgs)]
struct Cli {
    /// print the version and the compiled backends
    #[argh(switch, short = 'V')]
    version: bool,
    #[argh(subcommand)]
    role: Option<Role>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Role {
    Hive(rbee::hive::Args),
    Keeper(rbee::keeper::Args),
    Queen(rbee::queen::Args),
    Worker(rbee::worker::Args),
    RpcServer(rbee::hive::lend::RpcArgs),
}

fn main() -> ExitCode {
    // Before any thread starts: it takes a variable out of the environment.
    rbee::process::take_ready_pipe();
    let argv = rbee::cli::normalize(std::env::args().collect());
    let strs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let cli = match parse(&strs) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if cli.version {
        println!(
            "rbee {} (backends: {}; kernels: {})",
            env!("CARGO_PKG_VERSION"),
            rbee::BACKENDS,
            rbee::worker::engine::kernel::NAME
        );
        return ExitCode::SUCCESS;
    }
    let Some(role) = cli.role else {
        eprintln!("rbee: name a role; `rbee --help` lists them");
        return ExitCode::from(2);
    };
    if let Role::RpcServer(args) = &role {
        // Its hive logs every line; llama.cpp's notes on each cached tensor are noise there.
        init_tracing("warn");
        // Blocking C code that serves until killed: no async runtime.
        return said(rbee::hive::lend::serve(args).map(|()| None));
    }
    if let Some(done) = service(&role, strs.get(2..).unwrap_or(&[])) {
        return said(done.map(Some));
    }
    run(role)
}

/// The command line read; on `--help` or a mistake, what was printed and the exit code.
fn parse(strs: &[&str]) -> Result<Cli, ExitCode> {
    let cmd = strs.first().map_or("rbee", |c| {
        std::path::Path::new(c)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("rbee")
    });
    let args = strs.get(1..).unwrap_or(&[]);
    match Cli::from_args(&[cmd], args) {
        Ok(cli) => Ok(cli),
        Err(early) if early.status.is_ok() => {
            println!("{}", early.output);
            Err(ExitCode::SUCCESS)
        }
        Err(early) => {
            let help = |prefix: &[&str]| {
                let asked: Vec<&str> = prefix.iter().copied().chain(["--help"]).collect();
                match Cli::from_args(&[cmd], &asked) {
                    Err(e) if e.status.is_ok() => Some(e.output),
                    _ => None,
                }
            };
            eprintln!("{cmd}: {}", rbee::cli::explain(&early.output, args, help));
            Err(ExitCode::from(2))
        }
    }
}

/// A one-shot action's end: what it says on stdout, or its error on stderr.
fn said(done: Result<Option<String>, String>) -> ExitCode {
    match done {
        Ok(words) => {
            if let Some(words) = words {
                println!("{words}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rbee: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a role on the async runtime until it ends.
fn run(role: Role) -> ExitCode {
    if !matches!(role, Role::Keeper(_)) {
        // A daemon's connections are files: let it hold as many as it may.
        rbee::process::raise_open_file_limit();
        // What a daemon writes (stores, tokens, models) is its owner's alone.
        rbee::process::private_files();
    }
    // The keeper is a CLI: its stderr is for the person, not for info logs.
    init_tracing(if matches!(role, Role::Keeper(_)) {
        "warn"
    } else {
        "info,llama-cpp-2=warn"
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rbee: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match role {
            Role::Keeper(args) => return rbee::keeper::run(args).await,
            Role::Hive(args) => rbee::hive::run(args).await,
            Role::Queen(args) => rbee::queen::run(args).await,
            Role::Worker(args) => rbee::worker::run(args).await,
            Role::RpcServer(_) => Ok(()),
        }
        .map(|()| 0)
    });
    // Stray background tasks must not hold the process open.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // A daemon that fails before it is ready tells its starter why.
            rbee::process::report_failure(rbee::protocol::StartFailure::Other, &e);
            eprintln!("rbee: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--install-service` / `--uninstall-service` of a daemon role, done instead of running it.
fn service(role: &Role, flags: &[&str]) -> Option<Result<String, String>> {
    let (name, install, uninstall) = match role {
        Role::Hive(a) => ("hive", a.install_service, a.uninstall_service),
        Role::Queen(a) => ("queen", a.install_service, a.uninstall_service),
        _ => return None,
    };
    let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    match (install, uninstall) {
        (false, false) => None,
        (true, true) => Some(Err(
            "--install-service and --uninstall-service are opposites: give one".into(),
        )),
        (true, false) => Some(
            rbee::service::Service::from_here(name, &flags)
                .and_then(|s| rbee::service::install(&s)),
        ),
        (false, true) => Some(rbee::service::uninstall(name)),
    }
}

/// Logs go to stderr, filtered by `RUST_LOG`; stdout belongs to the keeper's tokens.
/// llama.cpp is chatty at info level, so it is held to warnings unless asked.
/// Colour only on a terminal: a daemon's stderr is usually its log file.
fn init_tracing(default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
}
