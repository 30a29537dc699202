//! Starting and signalling rbee's own child processes.
//!
//! Daemons start children (a hive its workers, a queen its local hive) that
//! must not outlive them, even when the parent is SIGKILLed. Linux's
//! parent-death signal does that, but it follows the *thread* that forked, so
//! every child is started by one [`Spawner`] thread that lives as long as the
//! process.

use std::process::{Child, Command};
use std::sync::mpsc;
use tokio::sync::oneshot;

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

/// Whether a process runs; a zombie that is waiting to be reaped does not count.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
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
