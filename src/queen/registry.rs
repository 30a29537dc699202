//! The queen's hives: the registered ones (in sled, surviving restarts) and
//! the local hive the queen may start itself (`local_hive.rs`). How each is
//! doing is the live view's business (`view.rs`).
//!
//! The registered hives live in a [`Store`]: a damaged registry stops the
//! queen, naming the hives it lost.

use super::local_hive::LocalHive;
use crate::protocol::{AddHive, ApiError, ErrorCode};
use crate::store::Store;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The name of the hive on the queen's own machine.
pub const LOCALHOST: &str = "localhost";

/// What the queen needs to talk to a hive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiveConn {
    pub name: String,
    pub url: String,
    pub token: Option<String>,
    /// The certificate it must present over TLS (`https://` URLs).
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// How it came: `local`, `added`, `token` or `mdns` (`HiveStatus::found`).
    #[serde(default)]
    pub found: String,
}

#[derive(Clone)]
pub struct Registry {
    store: Store,
    /// The hive this queen starts itself on `localhost`.
    local: LocalHive,
    /// Whether it may (`--no-local-hive` says not).
    local_allowed: bool,
    /// The registered hives' fingerprints: the certificates this queen's
    /// TLS accepts (its hives', and their workers', which show their hive's).
    pins: crate::http::tls::Pins,
}

impl Registry {
    pub fn open(
        data_dir: PathBuf,
        token: Option<String>,
        local_allowed: bool,
    ) -> Result<Registry, String> {
        let path = data_dir.join("queen-hives");
        let recovery = format!(
            "Move it away (mv {0} {0}.damaged; mv {0}.check {0}.check.damaged), start the queen \
             again and add the hives again with `rbee keeper hive add NAME --url URL`",
            path.display()
        );
        let store = Store::open(&path, "hive registry", "queen", &recovery)?;
        let registered: Vec<HiveConn> = store.list();
        let pins =
            crate::http::tls::Pins::new(registered.into_iter().filter_map(|h| h.fingerprint));
        Ok(Registry {
            store,
            local: LocalHive::new(data_dir, token)?,
            local_allowed,
            pins,
        })
    }

    /// The fingerprints this queen pins (its TLS is installed with them).
    pub fn pins(&self) -> crate::http::tls::Pins {
        self.pins.clone()
    }

    /// `hive add`: a hive by its URL, `http://` on this machine, `https://`
    /// beyond it (its certificate pinned: the fingerprint given, else the
    /// one it presents now).
    pub async fn add(&self, hive: AddHive) -> Result<HiveConn, ApiError> {
        crate::protocol::check_name("hive", &hive.name)?;
        let url = hive.url.trim_end_matches('/').to_string();
        let parsed: Option<hyper::Uri> =
            url.parse().ok().filter(|u: &hyper::Uri| u.host().is_some());
        let Some(uri) = parsed else {
            return Err(ApiError::invalid(
                "url",
                format!("hive url {url:?} must look like https://host:port"),
            ));
        };
        let here = super::hives::on_this_machine(&url, None);
        let fingerprint = match uri.scheme_str() {
            Some("http") if here => None,
            Some("http") => {
                return Err(ApiError::invalid(
                    "url",
                    format!(
                        "a hive on another machine is reached over TLS: https://{}, or join it \
                         with a token (`rbee keeper join-token`)",
                        uri.authority().map_or("", |a| a.as_str())
                    ),
                ))
            }
            Some("https") => {
                let seen = crate::http::client::probe_identity(&url)
                    .await
                    .map_err(|e| {
                        ApiError::new(
                            ErrorCode::HiveUnreachable,
                            format!("hive {}: {e}", hive.name),
                        )
                    })?;
                match hive.fingerprint.as_deref().map(str::trim) {
                    Some(want) if !want.eq_ignore_ascii_case(&seen) => {
                        return Err(ApiError::new(
                            ErrorCode::Forbidden,
                            format!(
                                "the hive at {url} presents {seen}, not {want}: nothing registered"
                            ),
                        ))
                    }
                    _ => Some(seen),
                }
            }
            _ => {
                return Err(ApiError::invalid(
                    "url",
                    format!("hive url {url:?} must look like https://host:port"),
                ))
            }
        };
        self.register(HiveConn {
            name: hive.name,
            url,
            token: hive.token.filter(|t| !t.is_empty()),
            fingerprint,
            found: "added".into(),
        })
    }

    /// Registers (or re-registers) a hive and pins its certificate; a name
    /// held by another certificate is refused.
    pub fn register(&self, conn: HiveConn) -> Result<HiveConn, ApiError> {
        crate::protocol::check_name("hive", &conn.name)?;
        let old: Option<HiveConn> = self.store.get(&conn.name);
        if let Some(old) = &old {
            if old.fingerprint.is_some()
                && conn.found != "added"
                && old.fingerprint != conn.fingerprint
            {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!(
                        "a hive named {} is already registered with another certificate: remove it \
                         first (`rbee keeper hive remove {}`) or join under another --name",
                        conn.name, conn.name
                    ),
                ));
            }
        }
        self.store
            .put(&conn.name, &conn)
            .map_err(ApiError::internal)?;
        if let Some(fp) = old.and_then(|o| o.fingerprint) {
            self.pins.remove(&fp);
        }
        if let Some(fp) = &conn.fingerprint {
            self.pins.add(fp);
        }
        Ok(conn)
    }

    /// The registered hive whose certificate is `fingerprint`.
    pub fn by_fingerprint(&self, fingerprint: &str) -> Option<HiveConn> {
        self.registered()
            .into_iter()
            .find(|h| h.fingerprint.as_deref() == Some(fingerprint))
    }

    /// Forgets a registered hive; false if there was none by that name.
    pub fn remove(&self, name: &str) -> Result<bool, ApiError> {
        let old: Option<HiveConn> = self.store.remove(name).map_err(ApiError::internal)?;
        // Its certificate is refused from now on: it comes back with a new join token.
        if let Some(fp) = old.as_ref().and_then(|o| o.fingerprint.as_deref()) {
            self.pins.remove(fp);
        }
        Ok(old.is_some())
    }

    fn registered(&self) -> Vec<HiveConn> {
        self.store.list()
    }

    /// Every hive this queen can use: the registered ones, then its local hive if running.
    pub async fn all(&self) -> Vec<HiveConn> {
        let mut all = self.registered();
        if let Some(local) = self.local.conn().await {
            if !all.iter().any(|h| h.name == local.name) {
                all.push(local);
            }
        }
        all
    }

    pub async fn get(&self, name: &str) -> Option<HiveConn> {
        self.all().await.into_iter().find(|h| h.name == name)
    }

    /// Whether `name` is the hive this queen started itself.
    pub async fn is_managed(&self, name: &str) -> bool {
        self.local.conn().await.is_some_and(|l| l.name == name)
    }

    /// The local hive, started now if it is not running. `narrate` hears what happens.
    pub async fn ensure_local(&self, narrate: impl Fn(&str, String)) -> Result<HiveConn, String> {
        if !self.local_allowed {
            return Err(
                "this queen starts no hive of its own (--no-local-hive, RBEE_LOCAL_HIVE=off): \
                 register one with `rbee keeper hive add`"
                    .into(),
            );
        }
        self.local.ensure(narrate).await
    }

    /// Whether this queen may start a hive on its own machine.
    pub fn local_allowed(&self) -> bool {
        self.local_allowed
    }

    /// Stops the local hive, which stops its workers first; waits a bounded time.
    pub async fn stop_local(&self) {
        self.local.stop().await;
    }
}
