//! A stand-in for Hugging Face: serves repositories in its URL layout
//! (`/api/models/{repo}` listings, `/{repo}/resolve/main/{file}` with `Range`
//! and a sha256 ETag), and misbehaves on demand.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct Faults {
    /// Close the next file transfer after this many body bytes.
    pub cut_after: Option<u64>,
    /// Serve file bodies at about this many bytes per second.
    pub bytes_per_sec: Option<u64>,
    /// List every file with a wrong sha256.
    pub wrong_sha: bool,
    /// Answer 401 to requests without `Authorization: Bearer <this>`.
    pub token: Option<String>,
}

/// One file request as the server saw it: the file and the first byte asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRequest {
    pub file: String,
    pub from: u64,
    pub sent: u64,
}

struct File {
    path: PathBuf,
    size: u64,
    sha256: String,
}

struct State {
    repos: HashMap<String, Vec<(String, Option<File>)>>,
    faults: Faults,
    log: Vec<FileRequest>,
}

pub struct HfServer {
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl HfServer {
    pub fn start() -> HfServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State {
            repos: HashMap::new(),
            faults: Faults::default(),
            log: Vec::new(),
        }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let state = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &state);
                });
            }
        });
        HfServer { url, state }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a repo holding `gguf` (served from disk, with its real sha256) and a README.
    pub fn add_repo(&self, repo: &str, name: &str, gguf: &std::path::Path, sha256: &str) {
        let size = std::fs::metadata(gguf).expect("model file").len();
        let file = File {
            path: gguf.to_path_buf(),
            size,
            sha256: sha256.to_string(),
        };
        self.lock().repos.insert(
            repo.to_string(),
            vec![
                (name.to_string(), Some(file)),
                ("README.md".to_string(), None),
            ],
        );
    }

    pub fn add_repo_without_gguf(&self, repo: &str) {
        self.lock()
            .repos
            .insert(repo.to_string(), vec![("README.md".to_string(), None)]);
    }

    pub fn faults(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.lock().faults);
    }

    pub fn file_requests(&self) -> Vec<FileRequest> {
        self.lock().log.clone()
    }
}

fn serve(conn: TcpStream, state: &Arc<Mutex<State>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let target = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let path = target.split('?').next().unwrap_or("/");
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());

    if let Some(token) = &lock().faults.token {
        if headers.get("authorization") != Some(&format!("Bearer {token}")) {
            return respond(
                &mut out,
                "401 Unauthorized",
                "application/json",
                br#"{"error":"Invalid credentials"}"#,
            );
        }
    }
    if let Some(repo) = path.strip_prefix("/api/models/") {
        let s = lock();
        let Some(files) = s.repos.get(repo) else {
            return respond(
                &mut out,
                "404 Not Found",
                "application/json",
                br#"{"error":"Repository not found"}"#,
            );
        };
        let siblings: Vec<serde_json::Value> = files
            .iter()
            .map(|(name, file)| match file {
                Some(f) => {
                    let sha = if s.faults.wrong_sha { "0".repeat(64) } else { f.sha256.clone() };
                    serde_json::json!({"rfilename": name, "size": f.size, "lfs": {"sha256": sha, "size": f.size}})
                }
                None => serde_json::json!({"rfilename": name, "size": 12}),
            })
            .collect();
        let body = serde_json::json!({"id": repo, "siblings": siblings}).to_string();
        return respond(&mut out, "200 OK", "application/json", body.as_bytes());
    }
    if let Some((repo, file)) = path.trim_start_matches('/').split_once("/resolve/main/") {
        let (disk, size, cut, rate) = {
            let mut s = lock();
            let found = s
                .repos
                .get(repo)
                .and_then(|files| files.iter().find(|(n, _)| n == file))
                .and_then(|(_, f)| f.as_ref())
                .map(|f| (f.path.clone(), f.size));
            let Some((disk, size)) = found else {
                drop(s);
                return respond(&mut out, "404 Not Found", "text/plain", b"Entry not found");
            };
            let cut = s.faults.cut_after.take();
            (disk, size, cut, s.faults.bytes_per_sec)
        };
        let from = headers
            .get("range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        if from >= size && from > 0 {
            return respond(&mut out, "416 Range Not Satisfiable", "text/plain", b"");
        }
        let index = {
            let mut s = lock();
            s.log.push(FileRequest {
                file: file.to_string(),
                from,
                sent: 0,
            });
            s.log.len() - 1
        };
        let status = if from > 0 {
            "206 Partial Content"
        } else {
            "200 OK"
        };
        let mut head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\naccept-ranges: bytes\r\nconnection: close\r\n",
            size - from
        );
        if from > 0 {
            head.push_str(&format!(
                "content-range: bytes {from}-{}/{size}\r\n",
                size - 1
            ));
        }
        head.push_str("\r\n");
        out.write_all(head.as_bytes())?;
        let mut f = std::fs::File::open(disk)?;
        f.seek(SeekFrom::Start(from))?;
        let mut buf = vec![0u8; 64 << 10];
        let mut sent = 0u64;
        let started = Instant::now();
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            let n = match cut {
                Some(limit) if sent + n as u64 >= limit => (limit - sent) as usize,
                _ => n,
            };
            out.write_all(&buf[..n])?;
            sent += n as u64;
            lock().log[index].sent = sent;
            if cut.is_some_and(|limit| sent >= limit) {
                // Drop the connection mid-file, as a flaky network would.
                let _ = out.shutdown(std::net::Shutdown::Both);
                return Ok(());
            }
            if let Some(rate) = rate {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        return Ok(());
    }
    respond(&mut out, "404 Not Found", "text/plain", b"not found")
}

fn respond(
    out: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )?;
    out.write_all(body)
}
