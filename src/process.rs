//! Starting and signalling rbee's own child processes.
//!
//! Daemons start children (a hive its workers, a queen its local hive) that
//! must not outlive them, even when the parent is SIGKILLed. Linux's
//! parent-death signal does that, but it follows the *thread* that forked, so
//! every child is started by one [`Spawner`] thread that lives as long as the
//! process.
//!
//! A child *daemon* (the keeper's queen, the queen's local hive) is started
//! with [`start_daemon`]: it binds its port itself and reports on an inherited
//! pipe, one [`Readiness`] line, that it is ready and where, or why it could
//! not start. The starter waits on that line, not on polling a port, so there
//! is no bind-then-release race and a failure arrives with its reason (the
//! model is sccache's `ServerStartup`). The daemon's side is
//! [`take_ready_pipe`] (main, before any thread), [`bind`], [`report_ready`]
//! and [`report_failure`].

use crate::protocol::{Readiness, StartFailure};
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::oneshot;

/// Names the fd number of the readiness pipe a child daemon inherits.
pub const READY_FD_ENV: &str = "RBEE_READY_FD";

type Job = (Command, oneshot::Sender<std::io::Result<Child>>);

#[derive(Clone)]
pub struct Spawner {
    jobs: mpsc::Sender<Job>,
}

impl Spawner {
    pub fn new() -> std::io::Result<Spawner> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    die_with_parent(&mut command);
                    let _ = reply.send(command.spawn());
                }
            })?;
        Ok(Spawner { jobs })
    }

    /// Starts `command` as a child that gets SIGTERM when this process dies.
    pub async fn spawn(&self, command: Command) -> std::io::Result<Child> {
        let (tx, rx) = oneshot::channel();
        let gone = || std::io::Error::other("the spawner thread is gone");
        self.jobs.send((command, tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// Sends `sig` to `pid`; a process that is already gone is no error.
pub fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Raises this process's open-file limit to the most it may have (the hard
/// limit, at most 65,536): each connection a daemon holds is a file, and the
/// usual soft limit of 1,024 would let a few hundred idle ones starve it.
pub fn raise_open_file_limit() {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit read and write a struct we own.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                limit.rlim_cur = limit.rlim_max.min(65_536);
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    }
}

/// Makes every file and directory this process (and its children) creates
/// its owner's alone: 0600 and 0700 (umask 077). A data dir holds hive
/// tokens and the registry; no other user of the machine reads them.
pub fn private_files() {
    #[cfg(unix)]
    // SAFETY: umask takes an integer and cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

/// The files this process may have open (its soft limit), when known.
pub fn open_file_limit() -> Option<usize> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes a struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            return Some(usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX));
        }
    }
    None
}

/// Caps this process's address space (RLIMIT_AS) at `bytes`: past it an
/// allocation fails (a C++ `bad_alloc`, caught at the engine's exception
/// boundary, or a Rust abort) in this process alone, not in the machine's
/// OOM killer's choice of victim.
pub fn limit_address_space(bytes: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let limit = libc::rlimit {
            rlim_cur: bytes as libc::rlim_t,
            rlim_max: bytes as libc::rlim_t,
        };
        // SAFETY: setrlimit reads a struct that outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(unix))]
    let _ = bytes;
    Ok(())
}

/// Whether a process runs; a zombie that is waiting to be reaped does not count.
pub fn alive(pid: u32) -> bool {
    crate::machine::running(pid)
}

/// Has the kernel SIGTERM the child when the spawning thread's process dies.
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        command.pre_exec(move || {
            #[cfg(target_os = "linux")]
            {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                // The parent may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
            }
            #[cfg(not(target_os = "linux"))]
            let _ = parent;
            Ok(())
        });
    }
}

/// Starts `command` in a session of its own, so it outlives this process and
/// its terminal (the keeper waking a queen).
pub fn spawn_detached(mut command: Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    command.spawn()
}

/// How long a started daemon may live.
pub enum Lifetime<'a> {
    /// In a session of its own, outliving its starter (the keeper's queen).
    Detached,
    /// Dying with this process, started by its spawner thread (the queen's local hive).
    DiesWith(&'a Spawner),
}

/// A child daemon that reported ready.
#[derive(Debug)]
pub struct Started {
    pub addr: SocketAddr,
    /// Still to be reaped by whoever keeps it (or left to init, when detached).
    pub child: Child,
}

/// Why a child daemon is not running. The message is for a person: it says
/// what happened and names the daemon's log.
#[derive(Debug, Clone, PartialEq)]
pub struct StartError {
    pub reason: StartFailure,
    pub message: String,
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl StartError {
    fn other(message: String) -> StartError {
        StartError {
            reason: StartFailure::Other,
            message,
        }
    }
}

/// `rbee ROLE`: this very executable in another role, ready for its arguments.
pub fn own_command(role: &str) -> Result<Command, StartError> {
    let exe = std::env::current_exe()
        .map_err(|e| StartError::other(format!("cannot find this executable: {e}")))?;
    let mut command = Command::new(exe);
    command.arg(role);
    Ok(command)
}

/// Starts `command`, a daemon called `name` in messages, with stderr appended
/// to `log`, and waits up to `timeout` for its readiness report. A daemon that
/// fails, dies or stays silent is reaped (killed, when silent).
pub async fn start_daemon(
    mut command: Command,
    name: &str,
    log: &Path,
    lifetime: Lifetime<'_>,
    timeout: Duration,
) -> Result<Started, StartError> {
    let see_log = format!("see {}", log.display());
    // What this start writes to the log begins here: its last lines are the reason.
    let log_start = std::fs::metadata(log).map_or(0, |m| m.len());
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    {
        use std::os::unix::fs::OpenOptionsExt;
        // A daemon's log names its models, hives and clients: its owner's alone.
        options.mode(0o600);
    }
    let log_file = options
        .open(log)
        .map_err(|e| StartError::other(format!("cannot open {}: {e}", log.display())))?;
    // Both ends are close-on-exec, so children started at the same time by
    // other threads do not hold the pipe open; only this child gets the write end.
    let (reader, writer) = std::io::pipe()
        .map_err(|e| StartError::other(format!("cannot make a pipe for {name}: {e}")))?;
    let fd = writer.as_raw_fd();
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .env(READY_FD_ENV, fd.to_string());
    inherit_fd(&mut command, fd);
    let spawned = match lifetime {
        Lifetime::Detached => spawn_detached(command),
        Lifetime::DiesWith(spawner) => spawner.spawn(command).await,
    };
    // With our copy closed, the pipe ends when the child closes it or exits.
    drop(writer);
    let child = spawned.map_err(|e| StartError::other(format!("cannot start {name}: {e}")))?;
    match tokio::time::timeout(timeout, read_report(reader)).await {
        Ok(Ok(Some(Readiness::Ready { addr }))) => Ok(Started { addr, child }),
        Ok(Ok(Some(Readiness::Failed { reason, message }))) => {
            reap(child);
            Err(StartError {
                reason,
                message: format!("{name} could not start: {message} ({see_log})"),
            })
        }
        Ok(Ok(None)) => {
            let status = exit_status(child).await;
            Err(StartError::other(format!(
                "{name} {status} before reporting ready{}; {see_log}",
                last_lines(log, log_start)
            )))
        }
        Ok(Err(e)) => {
            kill(child);
            Err(StartError::other(format!(
                "{name} sent an unreadable readiness report ({e}); {see_log}"
            )))
        }
        Err(_) => {
            kill(child);
            Err(StartError::other(format!(
                "{name} did not report ready within {}s{}; {see_log}",
                timeout.as_secs_f32(),
                last_lines(log, log_start)
            )))
        }
    }
}

/// The last lines a daemon wrote to its log after `start` (its reason for
/// dying, usually), as `: …` to follow a message; empty when it wrote none.
fn last_lines(log: &Path, start: u64) -> String {
    use std::io::{Read, Seek};
    let mut text = String::new();
    let read = std::fs::File::open(log).and_then(|mut f| {
        f.seek(std::io::SeekFrom::Start(start))?;
        f.take(64 * 1024).read_to_string(&mut text)
    });
    if read.is_err() {
        return String::new();
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    match lines.len() {
        0 => String::new(),
        n => format!(": {}", lines[n.saturating_sub(3)..].join(" / ")),
    }
}

/// Lets the child keep `fd` across exec (it was made close-on-exec).
fn inherit_fd(command: &mut Command, fd: RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and calls only fcntl,
    // which is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The one report line; `None` when the pipe closed without one.
async fn read_report(pipe: std::io::PipeReader) -> std::io::Result<Option<Readiness>> {
    let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(pipe))?;
    let mut line = String::new();
    // A report is one short line; a child writing more is not speaking this protocol.
    tokio::io::BufReader::new(rx.take(64 * 1024))
        .read_line(&mut line)
        .await?;
    if line.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&line)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// How a child that closed its pipe without a report ended, as "exited (…)".
async fn exit_status(mut child: Child) -> String {
    let pid = child.id();
    let waited = tokio::task::spawn_blocking(move || child.wait());
    // It closed the pipe, so it is exiting; one that closed it and lives on is not ours to wait for.
    match tokio::time::timeout(Duration::from_secs(5), waited).await {
        Ok(Ok(Ok(status))) => format!("exited ({})", describe(status)),
        Ok(_) => "exited".into(),
        Err(_) => {
            signal(pid, libc::SIGKILL);
            "closed its readiness pipe without a report".into()
        }
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(sig) => format!("killed by signal {sig}"),
        None => status.to_string(),
    }
}

/// Waits for a child on a thread of its own, so it leaves no zombie behind.
pub fn reap(mut child: Child) {
    std::thread::spawn(move || {
        let _ = child.wait();
    });
}

fn kill(child: Child) {
    signal(child.id(), libc::SIGKILL);
    reap(child);
}

/// The readiness pipe this daemon was started with, until it reports on it.
static READY_PIPE: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Takes the readiness pipe named by `RBEE_READY_FD`. Called once by main
/// before any thread starts, because it edits the environment: the variable
/// goes, and the fd is closed on exec, so this daemon's own children (a hive's
/// workers) neither see nor hold it.
pub fn take_ready_pipe() {
    let Some(value) = std::env::var_os(READY_FD_ENV) else {
        return;
    };
    std::env::remove_var(READY_FD_ENV);
    let Some(fd) = value.to_str().and_then(|v| v.parse::<RawFd>().ok()) else {
        return;
    };
    // A number from a shell by mistake must not make us write into some other file.
    if fd <= 2 || !is_pipe(fd) {
        return;
    }
    // SAFETY: fcntl on an open fd has no memory-safety preconditions.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the fd is open and a pipe, inherited for this report alone, so
    // nothing else in this process owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    *READY_PIPE.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
}

fn is_pipe(fd: RawFd) -> bool {
    // SAFETY: fstat writes into the zeroed struct we pass and nothing else.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFIFO
    }
}

/// Writes the one report and closes the pipe; later reports are no-ops, as
/// are reports of a daemon nobody waits for (started by hand).
fn report(readiness: &Readiness) {
    let pipe = READY_PIPE.lock().unwrap_or_else(|p| p.into_inner()).take();
    let Some(mut pipe) = pipe else {
        return;
    };
    if let Ok(mut line) = serde_json::to_vec(readiness) {
        line.push(b'\n');
        // A starter that gave up waiting is gone; there is nobody to tell.
        let _ = pipe.write_all(&line);
    }
}

/// Tells whoever started this daemon that it listens on `addr` and is ready.
pub fn report_ready(addr: SocketAddr) {
    report(&Readiness::Ready { addr });
}

/// Tells whoever started this daemon why it could not start.
pub fn report_failure(reason: StartFailure, message: &str) {
    report(&Readiness::Failed {
        reason,
        message: message.to_string(),
    });
}

/// Binds a daemon's listener; a port someone else holds is reported as
/// [`StartFailure::PortTaken`], so a starter that can use any port moves on.
pub async fn bind(host: &str, port: u16) -> Result<tokio::net::TcpListener, String> {
    match crate::http::listen(host, port).await {
        Ok(listener) => Ok(listener),
        Err(e) => {
            let message = format!("cannot listen on {host}:{port}: {e}");
            if e.kind() == std::io::ErrorKind::AddrInUse {
                report_failure(StartFailure::PortTaken, &message);
            }
            Err(message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log file of its own for each test.
    fn log(label: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("rbee-process-{}-{label}.log", std::process::id()))
    }

    /// `sh -c SCRIPT`, where `$RBEE_READY_FD` is the readiness pipe.
    fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    }

    async fn start(script: &str, label: &str, timeout: Duration) -> Result<Started, StartError> {
        let log = log(label);
        let result = start_daemon(
            sh(script),
            "the test daemon",
            &log,
            Lifetime::Detached,
            timeout,
        );
        let result = result.await;
        let _ = std::fs::remove_file(&log);
        result
    }

    #[tokio::test]
    async fn a_ready_child_reports_its_address() {
        let script = r#"echo '{"status":"ready","addr":"127.0.0.1:4242"}' > /dev/fd/$RBEE_READY_FD; exec sleep 5"#;
        let started = start(script, "ready", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(started.addr, "127.0.0.1:4242".parse().unwrap());
        kill(started.child);
    }

    #[tokio::test]
    async fn a_child_started_by_the_spawner_reports_too() {
        let spawner = Spawner::new().unwrap();
        let script = r#"echo '{"status":"ready","addr":"127.0.0.1:1"}' > /dev/fd/$RBEE_READY_FD"#;
        let started = start_daemon(
            sh(script),
            "the test daemon",
            &log("spawner"),
            Lifetime::DiesWith(&spawner),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(started.addr.port(), 1);
        reap(started.child);
        let _ = std::fs::remove_file(log("spawner"));
    }

    #[tokio::test]
    async fn a_failing_child_gives_its_reason_and_log() {
        let script = r#"echo '{"status":"failed","reason":"port_taken","message":"cannot listen on 127.0.0.1:8500: in use"}' > /dev/fd/$RBEE_READY_FD; exit 1"#;
        let e = start(script, "failed", Duration::from_secs(10))
            .await
            .unwrap_err();
        assert_eq!(e.reason, StartFailure::PortTaken);
        assert!(e.message.contains("127.0.0.1:8500: in use"), "{e}");
        assert!(
            e.message.contains(&log("failed").display().to_string()),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_child_that_dies_silently_gives_its_exit_status_and_log() {
        let e = start("exit 3", "silent", Duration::from_secs(10))
            .await
            .unwrap_err();
        assert_eq!(e.reason, StartFailure::Other);
        assert!(e.message.contains("exit status: 3"), "{e}");
        assert!(
            e.message.contains(&log("silent").display().to_string()),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_child_that_never_reports_is_given_up_on() {
        let e = start("exec sleep 30", "slow", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(
            e.message.contains("did not report ready within 0.2s"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn nonsense_on_the_pipe_is_an_error_not_a_hang() {
        let script = "echo hello > /dev/fd/$RBEE_READY_FD; exec sleep 30";
        let e = start(script, "nonsense", Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(e.message.contains("unreadable readiness report"), "{e}");
    }

    #[test]
    fn the_report_line_is_what_the_starter_reads() {
        let line = serde_json::to_string(&Readiness::Failed {
            reason: StartFailure::PortTaken,
            message: "taken".into(),
        })
        .unwrap();
        assert_eq!(
            line,
            r#"{"status":"failed","reason":"port_taken","message":"taken"}"#
        );
    }
}
