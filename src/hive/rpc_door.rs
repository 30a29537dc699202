//! What passes from a tunnel to a lease's RPC server (DESIGN.md §12).
//!
//! llama.cpp's RPC server trusts its client: it reads a message of any size
//! it is told, waits forever for the next, and writes every large tensor it
//! is sent to its cache directory. The hive reads the borrower's messages
//! one by one on their way in (`| command (1 byte) | size (8 bytes, little
//! endian) | payload |`; answers go back untouched) and holds each tunnel to
//! its lease: no message larger than the lease could use, no more cached than
//! the lease's budget, and no tunnel left idle in the way of another (nor
//! reaching the server before its first message is whole).
//! (The server itself refuses buffers beyond the budget: `rpc.cpp`.)

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// llama.cpp's RPC commands (`enum rpc_cmd` in ggml-rpc.cpp, protocol 7).
const ALLOC_BUFFER: u8 = 0;
const SET_TENSOR: u8 = 6;
/// Those the server answers (the rest it only carries out).
const ANSWERED: [u8; 11] = [0, 1, 2, 3, 7, 8, 9, 11, 13, 14, 15];
/// `RPC_CMD_NONE` and above are not messages.
const COMMANDS: u8 = 18;
/// `sizeof(rpc_tensor)` (packed): a SET_TENSOR's payload starts with one,
/// then its cache flag (1 byte) and offset (8 bytes), then the data.
const RPC_TENSOR: u64 = 296;
const SET_TENSOR_HEAD: u64 = RPC_TENSOR + 1 + 8;
/// The largest message other than a tensor's data: a graph of about 50,000
/// nodes (a large model's whole graph is a few thousand).
const SMALL_MESSAGE: u64 = 16 << 20;
/// A tunnel that holds none of the lease's memory, waits for no answer and
/// sends nothing for this long is closed if another tunnel waits for the
/// lease (the server takes one client at a time, the others wait for their
/// first answer). The split worker's own tunnel holds its layers.
pub const IDLE: Duration = Duration::from_secs(15);
/// A message that stops arriving halfway for this long ends its tunnel: the
/// server cannot answer anyone until it is whole.
pub const STALLED: Duration = Duration::from_secs(60);

/// Why a tunnel was closed by its door.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Idle, holding nothing and waiting for nothing, while another tunnel waited.
    Idle,
    /// A message stopped arriving halfway.
    Stalled,
    /// A message larger than the lease could use.
    Oversized { command: u8, size: u64 },
    /// Not one of llama.cpp's commands.
    UnknownCommand(u8),
}

impl Fault {
    /// Its label in `rbee_hive_lease_faults_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Fault::Idle => "idle_tunnel",
            Fault::Stalled => "stalled_message",
            Fault::Oversized { .. } => "oversized_message",
            Fault::UnknownCommand(_) => "unknown_command",
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Idle => write!(
                f,
                "it held none of the lease's memory and sent nothing for {} s while another tunnel waited",
                IDLE.as_secs()
            ),
            Fault::Stalled => write!(
                f,
                "a message stopped arriving halfway for {} s",
                STALLED.as_secs()
            ),
            Fault::Oversized { command, size } => write!(
                f,
                "it sent a message (command {command}) of {size} bytes, more than the lease could use"
            ),
            Fault::UnknownCommand(c) => write!(f, "it sent {c}, which is no RPC command"),
        }
    }
}

/// One tunnel's door: the lease's budget and what the tunnel has sent.
#[derive(Debug)]
pub struct Door {
    budget: u64,
    /// Bytes the lease's server may still write to its cache directory
    /// (shared by the lease's tunnels).
    cache_left: Arc<AtomicU64>,
    /// Whether the tunnel has asked for a buffer (memory of the lease).
    holds: bool,
    /// Whether its last message asked for an answer that has not begun to
    /// come back (set here, cleared by the answers' direction).
    awaiting: Arc<AtomicBool>,
}

impl Door {
    pub fn new(budget: u64, cache_left: Arc<AtomicU64>) -> Door {
        Door {
            budget,
            cache_left,
            holds: false,
            awaiting: Arc::default(),
        }
    }

    /// Whether a message with this header may pass.
    pub fn admit(&mut self, command: u8, size: u64) -> Result<(), Fault> {
        if command >= COMMANDS {
            return Err(Fault::UnknownCommand(command));
        }
        let most = if command == SET_TENSOR {
            self.budget.saturating_add(SET_TENSOR_HEAD)
        } else {
            SMALL_MESSAGE
        };
        if size > most {
            return Err(Fault::Oversized { command, size });
        }
        self.holds |= command == ALLOC_BUFFER;
        if ANSWERED.contains(&command) {
            self.awaiting.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Whether the tunnel may be closed for idleness: it holds none of the
    /// lease's memory and waits for no answer.
    fn may_idle_out(&self) -> bool {
        !self.holds && !self.awaiting.load(Ordering::Relaxed)
    }

    /// Whether `data` bytes of a tensor the client asks to be cached may be:
    /// the lease's cache holds at most its budget, then tensors pass uncached.
    pub fn may_cache(&self, data: u64) -> bool {
        self.cache_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(data)
            })
            .is_ok()
    }
}

/// How often the first message is sent again to a server that closed the
/// connection without answering it (it was restarting after a malformed
/// message from another tunnel).
const FIRST_TRIES: u32 = 5;

/// Carries a tunnel: the client's messages to the server through `door`, the
/// server's answers back as they are, until either side closes (`Ok`) or the
/// door closes the tunnel (`Err`, with why). `contested` says whether
/// another tunnel waits for the lease.
///
/// The server is reached (`connect`) only once the client's first message
/// is whole, so a tunnel that sends nothing never holds it; that message is
/// kept until the server answers, and sent again to a new connection if the
/// server closed the first one unanswered.
pub async fn carry<C, S, F, Fut>(
    client: C,
    connect: F,
    mut door: Door,
    contested: impl Fn() -> bool,
) -> Result<(), Fault>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<S>>,
{
    let (client_r, mut client_w) = tokio::io::split(client);
    let mut from = tokio::io::BufReader::with_capacity(64 * 1024, client_r);
    let mut first = Vec::new();
    if !pass_message(&mut from, &mut first, &mut door, &contested).await? {
        return Ok(());
    }
    let mut answer = vec![0u8; 64 * 1024];
    let mut tries = 0;
    let (mut server_r, mut server_w, answered) = loop {
        tries += 1;
        let Ok(server) = connect().await else {
            return Ok(());
        };
        let (mut r, mut w) = tokio::io::split(server);
        if w.write_all(&first).await.is_ok() {
            if let Ok(n @ 1..) = r.read(&mut answer).await {
                break (r, w, n);
            }
        }
        if tries >= FIRST_TRIES {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    door.awaiting.store(false, Ordering::Relaxed);
    // Flushed: over TLS an answer's last record may wait in the session.
    let sent = client_w.write_all(&answer[..answered]).await;
    if sent.is_err() || client_w.flush().await.is_err() {
        return Ok(());
    }
    let awaiting = door.awaiting.clone();
    let back = async move {
        while let Ok(n) = server_r.read(&mut answer).await {
            if n == 0 {
                break;
            }
            awaiting.store(false, Ordering::Relaxed);
            let sent = client_w.write_all(&answer[..n]).await;
            if sent.is_err() || client_w.flush().await.is_err() {
                break;
            }
        }
    };
    let there = async {
        while pass_message(&mut from, &mut server_w, &mut door, &contested).await? {}
        Ok(())
    };
    tokio::select! {
        carried = there => carried,
        () = back => Ok(()),
    }
}

/// The client's messages to `to`, through the door, until the client closes.
#[cfg(test)]
async fn there<R, W>(
    from: R,
    mut to: W,
    mut door: Door,
    contested: impl Fn() -> bool,
) -> Result<(), Fault>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut from = tokio::io::BufReader::with_capacity(64 * 1024, from);
    while pass_message(&mut from, &mut to, &mut door, &contested).await? {}
    Ok(())
}

/// Passes the client's next message to `to` through the door; false when
/// either side has closed.
async fn pass_message<R, W>(
    from: &mut R,
    to: &mut W,
    door: &mut Door,
    contested: &impl Fn() -> bool,
) -> Result<bool, Fault>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut head = [0u8; 9];
    // Between messages.
    loop {
        match tokio::time::timeout(IDLE, from.read(&mut head[..1])).await {
            Ok(Ok(1)) => break,
            Ok(_) => return Ok(false),
            Err(_) if door.may_idle_out() && contested() => return Err(Fault::Idle),
            Err(_) => {}
        }
    }
    if !read_within(from, &mut head[1..]).await? {
        return Ok(false);
    }
    let command = head[0];
    let size = u64::from_le_bytes(head[1..].try_into().unwrap_or_default());
    door.admit(command, size)?;
    if to.write_all(&head).await.is_err() {
        return Ok(false);
    }
    let mut rest = size;
    if command == SET_TENSOR && size > SET_TENSOR_HEAD {
        let mut tensor_head = [0u8; RPC_TENSOR as usize + 1];
        if !read_within(from, &mut tensor_head).await? {
            return Ok(false);
        }
        let flag = &mut tensor_head[RPC_TENSOR as usize];
        if *flag != 0 && !door.may_cache(size - SET_TENSOR_HEAD) {
            *flag = 0;
        }
        if to.write_all(&tensor_head).await.is_err() {
            return Ok(false);
        }
        rest -= tensor_head.len() as u64;
    }
    copy_within(from, to, rest).await
}

/// Fills `buf`, each read within [`STALLED`]; false if the client closed.
async fn read_within<R: AsyncRead + Unpin>(from: &mut R, buf: &mut [u8]) -> Result<bool, Fault> {
    let mut got = 0;
    while got < buf.len() {
        match tokio::time::timeout(STALLED, from.read(&mut buf[got..])).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(false),
            Ok(Ok(n)) => got += n,
            Err(_) => return Err(Fault::Stalled),
        }
    }
    Ok(true)
}

/// Passes `count` bytes on, each read within [`STALLED`]; false if either
/// side closed.
async fn copy_within<R, W>(from: &mut R, to: &mut W, mut count: u64) -> Result<bool, Fault>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; count.min(64 * 1024) as usize];
    while count > 0 {
        let want = count.min(buf.len() as u64) as usize;
        let n = match tokio::time::timeout(STALLED, from.read(&mut buf[..want])).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(false),
            Ok(Ok(n)) => n,
            Err(_) => return Err(Fault::Stalled),
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return Ok(false);
        }
        count -= n as u64;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn door(budget: u64) -> Door {
        Door::new(budget, Arc::new(AtomicU64::new(budget)))
    }

    fn message(command: u8, payload: &[u8]) -> Vec<u8> {
        let mut m = vec![command];
        m.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        m.extend_from_slice(payload);
        m
    }

    fn set_tensor(cache: bool, data: usize) -> Vec<u8> {
        let mut payload = vec![0u8; RPC_TENSOR as usize];
        payload.push(u8::from(cache));
        payload.extend_from_slice(&0u64.to_le_bytes());
        payload.extend(std::iter::repeat_n(7u8, data));
        message(SET_TENSOR, &payload)
    }

    #[test]
    fn a_message_larger_than_the_lease_could_use_is_refused() {
        let mut d = door(1 << 20);
        assert_eq!(d.admit(SET_TENSOR, (1 << 20) + SET_TENSOR_HEAD), Ok(()));
        assert_eq!(
            d.admit(SET_TENSOR, (1 << 20) + SET_TENSOR_HEAD + 1),
            Err(Fault::Oversized {
                command: SET_TENSOR,
                size: (1 << 20) + SET_TENSOR_HEAD + 1
            })
        );
        // A graph is not a tensor's data: its own bound, whatever the budget.
        assert!(d.admit(10, SMALL_MESSAGE).is_ok());
        assert!(d.admit(10, SMALL_MESSAGE + 1).is_err());
        assert!(door(u64::MAX).admit(SET_TENSOR, u64::MAX).is_ok());
        assert_eq!(d.admit(18, 0), Err(Fault::UnknownCommand(18)));
        assert_eq!(d.admit(200, 0), Err(Fault::UnknownCommand(200)));
    }

    #[test]
    fn a_tunnel_holds_memory_once_it_asked_for_a_buffer() {
        let mut d = door(1 << 20);
        assert!(d.admit(14, 24).is_ok()); // HELLO
        assert!(d.admit(11, 4).is_ok()); // GET_DEVICE_MEMORY
        assert!(!d.holds);
        assert!(d.admit(ALLOC_BUFFER, 12).is_ok());
        assert!(d.holds);
    }

    #[test]
    fn the_cache_holds_at_most_the_budget_across_tunnels() {
        let shared = Arc::new(AtomicU64::new(100));
        let (a, b) = (
            Door::new(100, shared.clone()),
            Door::new(100, shared.clone()),
        );
        assert!(a.may_cache(60));
        assert!(!b.may_cache(60));
        assert!(b.may_cache(40));
        assert!(!a.may_cache(1));
    }

    async fn through(input: Vec<u8>, budget: u64, cache: u64) -> (Result<(), Fault>, Vec<u8>) {
        let mut out = Vec::new();
        let d = Door::new(budget, Arc::new(AtomicU64::new(cache)));
        let r = there(&input[..], &mut out, d, || false).await;
        (r, out)
    }

    #[tokio::test]
    async fn messages_pass_whole_and_a_tensor_beyond_the_cache_passes_uncached() {
        let mut input = message(14, &[0u8; 24]);
        input.extend(set_tensor(true, 1000));
        input.extend(set_tensor(true, 1000));
        input.extend(set_tensor(false, 10));
        let (r, out) = through(input.clone(), 1 << 20, 1500).await;
        assert_eq!(r, Ok(()));
        assert_eq!(out.len(), input.len());
        let flag = |m: usize| {
            let start = 33 + m * (9 + SET_TENSOR_HEAD as usize + 1000);
            out[start + 9 + RPC_TENSOR as usize]
        };
        assert_eq!(flag(0), 1, "the first fits the lease's cache");
        assert_eq!(flag(1), 0, "the second would pass the cache's bound");
        // Everything else is untouched.
        let mut expected = input.clone();
        expected[33 + 9 + SET_TENSOR_HEAD as usize + 1000 + 9 + RPC_TENSOR as usize] = 0;
        assert_eq!(out, expected);
    }

    #[tokio::test]
    async fn an_oversized_message_ends_the_tunnel_before_its_payload_passes() {
        let mut input = message(14, &[0u8; 24]);
        input.extend(set_tensor(false, 2000));
        let (r, out) = through(input, 1000, 0).await;
        assert!(
            matches!(
                r,
                Err(Fault::Oversized {
                    command: SET_TENSOR,
                    ..
                })
            ),
            "{r:?}"
        );
        assert_eq!(out.len(), 33, "only the HELLO passed");
    }

    /// A tunnel carried between a client and a server the test plays, and
    /// whether another tunnel waits.
    struct Carried {
        client: tokio::io::DuplexStream,
        server: tokio::io::DuplexStream,
        waiting: Arc<AtomicBool>,
        task: tokio::task::JoinHandle<Result<(), Fault>>,
    }

    /// The client's end, whether another tunnel waits, how often the
    /// server was reached, and the carrying task.
    type Spawned = (
        tokio::io::DuplexStream,
        Arc<AtomicBool>,
        Arc<std::sync::atomic::AtomicU32>,
        tokio::task::JoinHandle<Result<(), Fault>>,
    );

    /// A tunnel whose server is reached through `servers`, one per connect, last first.
    fn carried_to(servers: Vec<tokio::io::DuplexStream>) -> Spawned {
        let (client, client_end) = tokio::io::duplex(1 << 16);
        let servers = Arc::new(std::sync::Mutex::new(servers));
        let connects = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let waiting = Arc::new(AtomicBool::new(false));
        let (w, n) = (waiting.clone(), connects.clone());
        let task = tokio::spawn(async move {
            let connect = move || {
                n.fetch_add(1, Ordering::Relaxed);
                let next = servers.lock().ok().and_then(|mut s| s.pop());
                async move { next.ok_or_else(|| std::io::Error::other("nobody listens")) }
            };
            carry(client_end, connect, door(1 << 20), move || {
                w.load(Ordering::Relaxed)
            })
            .await
        });
        (client, waiting, connects, task)
    }

    fn carried() -> Carried {
        let (server, server_end) = tokio::io::duplex(1 << 16);
        let (client, waiting, _, task) = carried_to(vec![server_end]);
        Carried {
            client,
            server,
            waiting,
            task,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_that_sends_nothing_never_reaches_the_server() {
        let (server, server_end) = tokio::io::duplex(1 << 16);
        let (_client, waiting, connects, task) = carried_to(vec![server_end]);
        tokio::time::sleep(IDLE * 4).await;
        assert_eq!(connects.load(Ordering::Relaxed), 0);
        waiting.store(true, Ordering::Relaxed);
        tokio::time::sleep(IDLE * 2).await;
        assert_eq!(task.await.ok(), Some(Err(Fault::Idle)));
        drop(server);
    }

    #[tokio::test]
    async fn a_first_message_the_server_closed_unanswered_is_sent_again() {
        // The first connection lands on a server going away: closed at once.
        let (gone, gone_end) = tokio::io::duplex(1 << 16);
        drop(gone);
        let (mut server, server_end) = tokio::io::duplex(1 << 16);
        let (mut client, _, connects, _task) = carried_to(vec![server_end, gone_end]);
        let hello = message(14, &[0u8; 24]);
        client.write_all(&hello).await.unwrap_or_default();
        let mut got = vec![0u8; hello.len()];
        server.read_exact(&mut got).await.unwrap_or_default();
        assert_eq!(got, hello);
        server.write_all(&[9u8; 36]).await.unwrap_or_default();
        let mut answer = [0u8; 36];
        client.read_exact(&mut answer).await.unwrap_or_default();
        assert_eq!(answer, [9u8; 36]);
        assert_eq!(connects.load(Ordering::Relaxed), 2);
    }

    async fn hello(c: &mut Carried) {
        let hello = message(14, &[0u8; 24]);
        c.client.write_all(&hello).await.unwrap_or_default();
        let mut got = vec![0u8; hello.len()];
        c.server.read_exact(&mut got).await.unwrap_or_default();
        assert_eq!(got, hello);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_tunnel_holding_nothing_is_closed_only_while_another_waits() {
        let mut c = carried();
        hello(&mut c).await;
        c.server.write_all(&[0u8; 36]).await.unwrap_or_default();
        tokio::time::sleep(IDLE * 4).await;
        assert!(!c.task.is_finished(), "alone, an idle tunnel stays");
        c.waiting.store(true, Ordering::Relaxed);
        tokio::time::sleep(IDLE * 2).await;
        assert_eq!(c.task.await.ok(), Some(Err(Fault::Idle)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_waiting_for_its_first_answer_is_not_idle() {
        // The server serves another client: this one's HELLO waits.
        let mut c = carried();
        hello(&mut c).await;
        c.waiting.store(true, Ordering::Relaxed);
        tokio::time::sleep(IDLE * 10).await;
        assert!(!c.task.is_finished());
        // Answered, it may be idle again.
        c.server.write_all(&[0u8; 36]).await.unwrap_or_default();
        tokio::time::sleep(IDLE * 2).await;
        assert_eq!(c.task.await.ok(), Some(Err(Fault::Idle)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_holding_memory_stays_however_long_it_is_idle() {
        let mut c = carried();
        let mut alloc = 0u32.to_le_bytes().to_vec();
        alloc.extend_from_slice(&64u64.to_le_bytes());
        c.client
            .write_all(&message(ALLOC_BUFFER, &alloc))
            .await
            .unwrap_or_default();
        let mut got = [0u8; 21];
        c.server.read_exact(&mut got).await.unwrap_or_default();
        c.server.write_all(&[0u8; 24]).await.unwrap_or_default();
        c.waiting.store(true, Ordering::Relaxed);
        tokio::time::sleep(IDLE * 20).await;
        assert!(!c.task.is_finished());
        c.task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_that_stops_halfway_ends_its_tunnel() {
        let (client, server) = tokio::io::duplex(1024);
        let (_keep, mut write) = tokio::io::split(client);
        let (read, _) = tokio::io::split(server);
        let hello = message(14, &[0u8; 24]);
        write.write_all(&hello[..20]).await.unwrap_or_default();
        let task =
            tokio::spawn(
                async move { there(read, tokio::io::sink(), door(1 << 20), || false).await },
            );
        tokio::time::sleep(STALLED * 2).await;
        assert_eq!(task.await.ok(), Some(Err(Fault::Stalled)));
    }
}
