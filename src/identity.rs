//! A queen's or a hive's identity (issue 28): a key pair and a self-signed
//! certificate, made on the first start and kept in the data dir
//! (`ROLE-identity.crt`, and `ROLE-identity.key` readable by its owner
//! alone). Its fingerprint, the SHA-256 of the certificate, is what the other
//! side pins: `rbee queen --show-identity`, `rbee hive --show-identity`.
//!
//! An identity is never made anew over one that cannot be read: a changed
//! identity is what a pinning peer refuses, so a damaged file stops the
//! daemon saying what to do.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// A daemon's identity: its certificate and key, and the fingerprint others pin.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    /// `sha256:` and the certificate's SHA-256 in hex.
    pub fingerprint: String,
}

/// The identity of `role` (`queen`, `hive`) in `data_dir`, made now if it
/// has none.
pub fn load_or_make(data_dir: &Path, role: &str) -> Result<Identity, String> {
    let (cert_path, key_path) = paths(data_dir, role);
    match (cert_path.exists(), key_path.exists()) {
        (false, false) => make(&cert_path, &key_path, role)?,
        (true, true) => {}
        _ => {
            return Err(damaged(
                &cert_path,
                &key_path,
                "one of its two files is missing",
            ))
        }
    }
    let cert = CertificateDer::from_pem_file(&cert_path).map_err(|e| {
        damaged(
            &cert_path,
            &key_path,
            &format!("{}: {e}", cert_path.display()),
        )
    })?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
        damaged(
            &cert_path,
            &key_path,
            &format!("{}: {e}", key_path.display()),
        )
    })?;
    Ok(Identity {
        fingerprint: fingerprint(&cert),
        cert,
        key,
    })
}

/// `--show-identity`: prints the fingerprint of `role`'s identity in the
/// data dir `flag` names (made now if it has none).
pub fn show(flag: Option<&Path>, role: &str) -> Result<(), String> {
    let data_dir = crate::data_dir(flag);
    crate::create_data_dir(&data_dir)?;
    println!("{}", load_or_make(&data_dir, role)?.fingerprint);
    Ok(())
}

/// `sha256:` and the SHA-256 of a certificate (DER), in hex.
pub fn fingerprint(cert: &[u8]) -> String {
    format!("sha256:{}", crate::disk::hex(&Sha256::digest(cert)))
}

fn paths(data_dir: &Path, role: &str) -> (PathBuf, PathBuf) {
    (
        data_dir.join(format!("{role}-identity.crt")),
        data_dir.join(format!("{role}-identity.key")),
    )
}

fn damaged(cert: &Path, key: &Path, why: &str) -> String {
    format!(
        "this machine's identity cannot be read ({why}). A new one would be refused by every \
         machine that pinned it: to make one anyway, move both files away ({} and {}), start \
         again, and join the other machines again",
        cert.display(),
        key.display()
    )
}

/// A new key pair and self-signed certificate, written key first (0600).
fn make(cert_path: &Path, key_path: &Path, role: &str) -> Result<(), String> {
    // The names and addresses a client checking names (an OpenAI client
    // given this certificate as its CA file) may reach it by; rbee's own
    // peers check the fingerprint alone.
    let mut names = vec!["localhost".to_string(), format!("rbee-{role}")];
    let host = crate::machine::hostname();
    if !host.is_empty() && host.parse::<std::net::IpAddr>().is_err() {
        names.push(host);
    }
    names.extend(["127.0.0.1".to_string(), "::1".to_string()]);
    names.extend(crate::machine::addresses().iter().map(|ip| ip.to_string()));
    let key = rcgen::KeyPair::generate().map_err(|e| format!("cannot make a key pair: {e}"))?;
    let mut params = rcgen::CertificateParams::new(names)
        .map_err(|e| format!("cannot describe a certificate: {e}"))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("rbee {role}"));
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("cannot sign a certificate: {e}"))?;
    write_private(key_path, key.serialize_pem().as_bytes())?;
    write_private(cert_path, cert.pem().as_bytes())?;
    tracing::info!(
        "made this {role}'s identity: {} ({})",
        fingerprint(cert.der()),
        cert_path.display()
    );
    Ok(())
}

/// Writes a new file only its owner may read.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let mut file = options.open(path).map_err(fail)?;
    file.write_all(bytes).map_err(fail)?;
    file.sync_all().map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(label: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rbee-identity-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn an_identity_is_made_once_and_kept() {
        let d = dir("kept");
        let first = load_or_make(&d, "hive").unwrap();
        let again = load_or_make(&d, "hive").unwrap();
        assert_eq!(first.fingerprint, again.fingerprint);
        assert_eq!(first.fingerprint.len(), "sha256:".len() + 64);
        assert_eq!(first.fingerprint, fingerprint(&again.cert));
        // Each role of a data dir (the queen and its local hive share one) has its own.
        let queen = load_or_make(&d, "queen").unwrap();
        assert_ne!(queen.fingerprint, first.fingerprint);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(d.join("hive-identity.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_damaged_identity_is_refused_not_replaced() {
        let d = dir("damaged");
        let made = load_or_make(&d, "queen").unwrap();
        std::fs::write(d.join("queen-identity.key"), "not a key").unwrap();
        let e = load_or_make(&d, "queen").err().unwrap_or_default();
        assert!(
            e.contains("cannot be read") && e.contains("move both files away"),
            "{e}"
        );
        std::fs::remove_file(d.join("queen-identity.key")).unwrap();
        let e = load_or_make(&d, "queen").err().unwrap_or_default();
        assert!(e.contains("one of its two files is missing"), "{e}");
        // The certificate is still the one made: nothing was replaced.
        let cert = CertificateDer::from_pem_file(d.join("queen-identity.crt")).unwrap();
        assert_eq!(fingerprint(&cert), made.fingerprint);
        let _ = std::fs::remove_dir_all(&d);
    }
}
