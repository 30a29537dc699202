//! rbee turns the machines someone already has into one LLM inference cluster
//! for GGUF models. One executable, several roles; see ARCHITECTURE.md for the
//! map and DESIGN.md for the wire formats.

pub mod clients;
pub mod gguf;
pub mod hive;
pub mod http;
pub mod keeper;
pub mod openai;
pub mod process;
pub mod protocol;
pub mod queen;
pub mod worker;

/// Whether this binary was built with a GPU backend (CUDA or Metal).
pub const GPU_BACKEND: bool = cfg!(any(feature = "cuda", feature = "metal"));

/// The llama.cpp backends compiled into this binary, for `rbee --version`.
pub const BACKENDS: &str = env!("RBEE_BACKENDS");

/// Where a daemon keeps its state: `--data-dir`, else `$RBEE_HOME`, else
/// `~/.local/share/rbee` (DESIGN.md §5).
pub fn data_dir(flag: Option<&std::path::Path>) -> std::path::PathBuf {
    if let Some(dir) = flag {
        return dir.to_path_buf();
    }
    if let Some(home) = std::env::var_os("RBEE_HOME").filter(|h| !h.is_empty()) {
        return home.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    std::path::Path::new(&home).join(".local/share/rbee")
}

/// Parses `300`, `300s`, `5m`, `1h` or `250ms`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 30s, 5m, 1h)"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?} is not a duration (try 30s, 5m, 1h)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(parse_duration("300").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("m").is_err());
    }
}
