//! A split worker's remote devices (DESIGN.md §12): `--remote LAYERS@URL`,
//! the loopback port per lending hive that llama.cpp's RPC client connects
//! to (each connection tunnelled through the hive's `/v1/rpc`), and the exit
//! when a lender is gone.

/// `--remote LAYERS@URL`: the layers, and the URL of the lending hive's `/v1/rpc`.
pub fn parse(s: &str) -> Result<(u32, String), String> {
    let (layers, url) = s.split_once('@').ok_or_else(|| {
        format!("--remote {s:?}: write LAYERS@URL, as 15@http://mac:8080/v1/rpc?lease=ID")
    })?;
    let layers: u32 = layers
        .parse()
        .map_err(|_| format!("--remote {s:?}: {layers:?} is not a number of layers"))?;
    if layers == 0 {
        return Err(format!("--remote {s:?}: a remote takes at least one layer"));
    }
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(format!(
            "--remote {s:?}: the URL must start with https:// (http:// on this machine)"
        ));
    }
    Ok((layers, url.to_string()))
}

/// A loopback port per `--remote`, carried through its hive's `/v1/rpc`:
/// the endpoints llama.cpp's RPC client is given, with their layers.
pub async fn open_tunnels(
    remotes: &[String],
    own_token: Option<&str>,
) -> Result<Vec<(String, u32)>, String> {
    let tokens: Option<Vec<String>> = std::env::var(crate::protocol::REMOTE_TOKENS_ENV)
        .ok()
        .map(|t| t.split('\n').map(str::to_string).collect());
    let delay = std::env::var(crate::protocol::TUNNEL_DELAY_ENV)
        .ok()
        .and_then(|ms| ms.parse::<f64>().ok())
        .map_or(std::time::Duration::ZERO, |ms| {
            std::time::Duration::from_secs_f64(ms / 1000.0)
        });
    let mut endpoints = Vec::new();
    for (i, remote) in remotes.iter().enumerate() {
        let (layers, url) = parse(remote)?;
        let token = match &tokens {
            Some(t) => t.get(i).filter(|t| !t.is_empty()).cloned(),
            None => own_token.map(str::to_string),
        };
        let protocol = crate::protocol::RPC_PROTOCOL;
        let addr = crate::http::tunnel::listen(url.clone(), token, protocol, delay, lender_lost)
            .await
            .map_err(|e| format!("cannot open a loopback port for {url}: {e}"))?;
        tracing::info!(
            "{layers} layers on {url}, through 127.0.0.1:{}",
            addr.port()
        );
        endpoints.push((addr.to_string(), layers));
    }
    Ok(endpoints)
}

/// A lending hive closed its tunnel: its layers are gone, so this worker
/// cannot answer another token. It exits at once, as a lost worker (its hive
/// records why; the queen fails its requests over).
fn lender_lost(url: &str) {
    tracing::error!("lost the devices lent through {url}: the lending hive closed the tunnel");
    eprintln!(
        "rbee: error: lost the devices lent through {url} (the lending hive closed the tunnel)"
    );
    // Not `exit`: C++ destructors would run under the engine thread, inside ggml.
    // SAFETY: ends the process at once; stderr is unbuffered and written.
    unsafe { libc::_exit(1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_is_layers_at_an_https_url() {
        assert_eq!(
            parse("15@https://mac:8080/v1/rpc?lease=lease-1"),
            Ok((15, "https://mac:8080/v1/rpc?lease=lease-1".to_string()))
        );
        assert!(parse("2@http://127.0.0.1:8080/v1/rpc?lease=l").is_ok());
        for bad in [
            "http://mac:8080/v1/rpc",
            "x@http://mac",
            "0@http://mac",
            "3@ftp://mac",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.starts_with(&format!("--remote {bad:?}")), "{e}");
        }
    }
}
