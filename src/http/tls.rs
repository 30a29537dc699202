//! TLS 1.3 between machines, pinned both ways (issue 28, DESIGN.md §7).
//!
//! rbee has no certificate authority: each queen and hive has a self-signed
//! certificate (`identity.rs`) and its peers trust it by fingerprint, the
//! way Syncthing trusts a device ID. So the verifiers here check no chain
//! and no name; they accept a certificate whose SHA-256 is one of the
//! process's [`Pins`], and rustls checks that the peer holds its key (the
//! handshake's signature).
//!
//! A daemon's port speaks both: a connection that opens with a TLS record is
//! served over TLS, any other as plain HTTP, which is answered only from this
//! machine (`Auth` refuses plain requests from elsewhere). A client
//! certificate is asked for and optional: a keeper or an OpenAI client comes
//! with a token or key over TLS, a queen with its certificate.
//!
//! The process's TLS (its identity and whom it pins) is set once at start
//! ([`install`]); `client.rs` uses it for every `https://` URL.

use crate::identity::{fingerprint, Identity};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use std::collections::HashSet;
use std::sync::{Arc, OnceLock, RwLock};

/// The first byte of a TLS handshake record: how a TLS connection is told
/// from plain HTTP on the same port.
pub const HANDSHAKE: u8 = 0x16;

/// The fingerprints this process trusts as peers: a queen's hives, a hive's
/// queen (and, while a lease lives, its borrower), a worker's queen and
/// lenders. Shared: adding a hive to the registry pins it at once.
#[derive(Clone, Default, Debug)]
pub struct Pins(Arc<RwLock<HashSet<String>>>);

impl Pins {
    pub fn new(fingerprints: impl IntoIterator<Item = String>) -> Pins {
        Pins(Arc::new(RwLock::new(fingerprints.into_iter().collect())))
    }

    pub fn contains(&self, fingerprint: &str) -> bool {
        self.0.read().is_ok_and(|set| set.contains(fingerprint))
    }

    pub fn add(&self, fingerprint: &str) {
        if let Ok(mut set) = self.0.write() {
            set.insert(fingerprint.to_string());
        }
    }

    /// Every fingerprint pinned, in order.
    pub fn list(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .0
            .read()
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        all.sort();
        all
    }

    pub fn remove(&self, fingerprint: &str) {
        if let Ok(mut set) = self.0.write() {
            set.remove(fingerprint);
        }
    }
}

/// The fingerprint of the certificate a TLS peer presented (in a request's
/// extensions; absent on plain connections and for clients without one).
#[derive(Debug, Clone)]
pub struct PeerCert(pub String);

/// That a request came over TLS (in its extensions).
#[derive(Debug, Clone, Copy)]
pub struct Secure;

/// This process's TLS: the server side of its port, and the client side of
/// its `https://` calls.
pub struct Tls {
    pub server: Option<Arc<ServerConfig>>,
    pub client: Arc<ClientConfig>,
    pub pins: Pins,
    /// This process's own fingerprint, when it has an identity.
    pub fingerprint: Option<String>,
}

static INSTALLED: OnceLock<Tls> = OnceLock::new();

/// Sets this process's TLS: `identity` (none for a keeper) and the peers it
/// pins. Once per process; a second call is ignored.
pub fn install(identity: Option<&Identity>, pins: Pins) -> Result<&'static Tls, String> {
    let tls = Tls {
        server: identity.map(server_config).transpose()?.map(Arc::new),
        client: Arc::new(client_config(identity, Verify::Pinned(pins.clone()))?),
        fingerprint: identity.map(|i| i.fingerprint.clone()),
        pins,
    };
    Ok(INSTALLED.get_or_init(|| tls))
}

/// This process's TLS, if [`install`]ed.
pub fn installed() -> Option<&'static Tls> {
    INSTALLED.get()
}

/// A client configuration that accepts any certificate, for learning a
/// peer's fingerprint (the keeper's first contact with a queen, a joining
/// hive's addresses being checked): the caller compares what it saw.
pub fn probing() -> Result<Arc<ClientConfig>, String> {
    let identity = None;
    Ok(Arc::new(client_config(identity, Verify::Any)?))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(identity: &Identity) -> Result<ServerConfig, String> {
    let provider = provider();
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS: {e}"))?
        .with_client_cert_verifier(Arc::new(AnyClient(provider)))
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())
        .map_err(|e| format!("TLS: this machine's identity cannot serve: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn client_config(identity: Option<&Identity>, verify: Verify) -> Result<ClientConfig, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| format!("TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer { verify, provider }));
    let mut config = match identity {
        Some(i) => builder
            .with_client_auth_cert(vec![i.cert.clone()], i.key.clone_key())
            .map_err(|e| format!("TLS: this machine's identity cannot be presented: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Which server certificates a client accepts.
#[derive(Debug)]
enum Verify {
    Pinned(Pins),
    Any,
}

/// The client side: the server's certificate must be pinned.
#[derive(Debug)]
struct PinnedServer {
    verify: Verify,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.verify {
            Verify::Any => Ok(ServerCertVerified::assertion()),
            Verify::Pinned(pins) => {
                let seen = fingerprint(end_entity);
                if pins.contains(&seen) {
                    Ok(ServerCertVerified::assertion())
                } else {
                    Err(rustls::Error::General(format!(
                        "its certificate {seen} is not the one pinned"
                    )))
                }
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The server side: a client certificate is asked for, optional, and any
/// is accepted here; whether its fingerprint lets the request in is the
/// door's decision (`Auth`), which sees it as [`PeerCert`].
#[derive(Debug)]
struct AnyClient(Arc<CryptoProvider>);

impl ClientCertVerifier for AnyClient {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The fingerprint of the first certificate in `certs` (what a peer presented).
pub fn presented(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    certs.and_then(|c| c.first()).map(|c| fingerprint(c))
}

/// Whether `url` is reached over TLS: `https://`.
pub fn is_tls_url(url: &str) -> bool {
    url.get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(label: &str) -> Identity {
        let d = std::env::temp_dir().join(format!("rbee-tls-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let id = crate::identity::load_or_make(&d, "hive").unwrap();
        let _ = std::fs::remove_dir_all(&d);
        id
    }

    /// A handshake over a loopback socket pair: the client's verdict, and
    /// the client certificate the server saw.
    async fn handshake(
        server: &Identity,
        client: Option<&Identity>,
        pinned: Pins,
    ) -> (Result<(), String>, Option<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(server).unwrap()));
        let served = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(tcp).await.ok()?;
            presented(tls.get_ref().1.peer_certificates())
        });
        let config = client_config(client, Verify::Pinned(pinned)).unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let verdict = connector
            .connect(name, tcp)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        // A refused handshake leaves the server's accept failing: nothing seen.
        let seen = match verdict {
            Ok(()) => served.await.unwrap(),
            Err(_) => None,
        };
        (verdict, seen)
    }

    #[tokio::test]
    async fn a_server_is_accepted_only_by_its_pinned_fingerprint_and_sees_the_client_s() {
        let (hive, queen, stranger) = (identity("h"), identity("q"), identity("s"));
        let pins = Pins::new([hive.fingerprint.clone()]);
        let (verdict, seen) = handshake(&hive, Some(&queen), pins).await;
        assert_eq!(verdict, Ok(()));
        assert_eq!(seen.as_deref(), Some(queen.fingerprint.as_str()));

        // Another certificate where the hive was expected: refused, saying which.
        let pins = Pins::new([hive.fingerprint.clone()]);
        let (verdict, _) = handshake(&stranger, Some(&queen), pins).await;
        let e = verdict.unwrap_err();
        assert!(
            e.contains(&stranger.fingerprint) && e.contains("not the one pinned"),
            "{e}"
        );

        // A client without a certificate gets in at the TLS level (a keeper);
        // the door decides what it may do.
        let pins = Pins::new([hive.fingerprint.clone()]);
        let (verdict, seen) = handshake(&hive, None, pins).await;
        assert_eq!((verdict, seen), (Ok(()), None));
    }

    #[test]
    fn pins_are_shared_between_clones() {
        let pins = Pins::default();
        let seen_by_door = pins.clone();
        pins.add("sha256:aa");
        assert!(seen_by_door.contains("sha256:aa"));
        pins.remove("sha256:aa");
        assert!(!seen_by_door.contains("sha256:aa"));
        assert!(is_tls_url("HTTPS://x:1") && !is_tls_url("http://x"));
    }
}
