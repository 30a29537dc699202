//! rbee turns the machines someone already has into one LLM inference cluster
//! for GGUF models. One executable, several roles; see ARCHITECTURE.md for the
//! map and DESIGN.md for the wire formats.

pub mod answer;
pub mod anthropic;
pub mod cli;
pub mod clients;
pub mod discovery;
pub mod disk;
pub mod gbnf;
pub mod gguf;
pub mod hive;
pub mod http;
pub mod identity;
pub mod join_token;
pub mod keeper;
#[cfg(test)]
mod layers;
pub mod llama_server;
pub mod machine;
pub mod metrics;
pub mod model_ref;
pub mod ollama;
pub mod openai;
pub mod process;
pub mod protocol;
pub mod queen;
pub mod responses;
pub mod rpc;
pub mod schema;
pub mod service;
pub mod store;
pub mod suggest;
pub mod tool_calls;
pub mod worker;

/// Whether this binary was built with a GPU backend (CUDA or Metal).
pub const GPU_BACKEND: bool = cfg!(any(feature = "cuda", feature = "metal"));

/// The llama.cpp backends compiled into this binary, for `rbee --version`.
pub const BACKENDS: &str = env!("RBEE_BACKENDS");

/// The hive's catalog directory in the data dir (where the queen's local hive
/// keeps it too, so a queen knows whether this machine's hive ran before).
pub const HIVE_CATALOG: &str = "hive-catalog";

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

/// The text of a small file rbee reads by name (a token, a config, a schema):
/// only a regular file (a FIFO would hang the read, a device like
/// `/dev/zero` never end it), of at most `limit` bytes. `Err(None)` when
/// there is no such file; else what is wrong, in words.
pub fn read_small_file(path: &std::path::Path, limit: u64) -> Result<String, Option<String>> {
    use std::io::Read;
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(None),
        Err(e) => return Err(Some(format!("cannot read {shown}: {e}"))),
    };
    if !meta.is_file() {
        return Err(Some(format!("{shown} is not a regular file")));
    }
    if meta.len() > limit {
        return Err(Some(format!("{shown} is larger than {limit} bytes")));
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(limit + 1).read_to_string(&mut text))
        .map_err(|e| Some(format!("cannot read {shown}: {e}")))?;
    if text.len() as u64 > limit {
        return Err(Some(format!("{shown} is larger than {limit} bytes")));
    }
    Ok(text)
}

/// A token file's token: at most 4 KiB, trimmed.
pub fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    read_small_file(path, 4096)
        .map(|t| t.trim().to_string())
        .map_err(|e| e.unwrap_or_else(|| format!("no token file at {}", path.display())))
}

/// Creates a data dir (with its parents) that only its owner can enter: it
/// holds the hive tokens the queen keeps, and the models.
pub fn create_data_dir(dir: &std::path::Path) -> Result<(), String> {
    let fail =
        |e: std::io::Error| format!("cannot create the data directory {}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(fail)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
    }
    Ok(())
}

/// Parses `300`, `300s`, `5m`, `1h`, `30d` or `250ms`.
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
        "d" => Ok(Duration::from_secs(n * 86_400)),
        _ => Err(format!("{s:?} is not a duration (try 30s, 5m, 1h, 30d)")),
    }
}

/// Parses a size as people write it: `2GiB`, `512MB`, `1.5G` (G and M are
/// GiB and MiB). Returns MiB.
pub fn parse_size_mb(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let bad = || format!("{s:?} is not a size (try 2GiB, 1500MB, 8G)");
    let n: f64 = number.parse().map_err(|_| bad())?;
    let bytes_per = match unit.trim().to_ascii_lowercase().as_str() {
        "mib" | "m" => (1u64 << 20) as f64,
        "gib" | "g" => (1u64 << 30) as f64,
        "tib" | "t" => (1u64 << 40) as f64,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "" => return Err(format!("{s:?} has no unit (try {s}MiB or {s}GiB)")),
        _ => return Err(bad()),
    };
    let mb = n * bytes_per / (1u64 << 20) as f64;
    if !mb.is_finite() || mb < 1.0 || mb > (1u64 << 40) as f64 {
        return Err(format!("{s:?} is not a size between 1MiB and 1EiB"));
    }
    Ok(mb as u64)
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

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(parse_size_mb("2GiB").unwrap(), 2048);
        assert_eq!(parse_size_mb("2G").unwrap(), 2048);
        assert_eq!(parse_size_mb("512MiB").unwrap(), 512);
        assert_eq!(parse_size_mb("1000MB").unwrap(), 953);
        assert_eq!(parse_size_mb("4GB").unwrap(), 3814);
        assert_eq!(parse_size_mb("1.5GiB").unwrap(), 1536);
        assert!(parse_size_mb("2048").unwrap_err().contains("no unit"));
        assert!(parse_size_mb("lots").is_err());
        assert!(parse_size_mb("0MiB").is_err());
        assert!(parse_size_mb("-1GiB").is_err());
    }
}
