//! What a machine joining the cluster and the queen say (issue 28): the
//! keeper asks the queen for a join token; a hive proves one to the queen
//! (`POST /v1/join`) and, once joined, checks in on every start.

use serde::{Deserialize, Serialize};

/// `POST /v1/join-tokens` on the queen: a token a new machine joins with.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenRequest {
    /// How long it may be used, in seconds (default an hour).
    #[serde(default)]
    pub expires_s: Option<u64>,
    /// How many hives may join with it (default one).
    #[serde(default)]
    pub uses: Option<u32>,
    /// Put none of the queen's addresses in it: the hive finds the queen on
    /// the LAN (mDNS) by its fingerprint.
    #[serde(default)]
    pub no_addresses: bool,
}

/// The token made: the one line to paste on the new machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinToken {
    pub token: String,
    pub expires_at: String,
    pub uses: u32,
}

/// `POST /v1/join` on the queen, over TLS with the hive's certificate: a
/// hive proving a join token's secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub secret: String,
    pub name: String,
    /// The port the hive listens on.
    pub port: u16,
    /// Its addresses beyond loopback, as it sees them.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// How it found the queen: `token` (an address in it) or `mdns`.
    pub found: String,
}

/// `POST /v1/hives/checkin` on the queen, over TLS with a joined hive's
/// certificate: a restarted hive saying where it is now.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckIn {
    pub port: u16,
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// The queen's answer to a join or a check-in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Joined {
    /// The name the hive is registered under.
    pub name: String,
    /// The URL the queen reaches it at.
    pub url: String,
}
