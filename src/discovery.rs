//! Finding a queen on the LAN (issue 28): DNS-SD over multicast DNS,
//! `_rbee._tcp.local.`, as exo and LocalAI find their peers. mDNS needs no
//! server, no configuration and nothing but the LAN the hive is joining
//! over, and every desktop OS already speaks it.
//!
//! A queen that listens beyond loopback announces itself: its addresses
//! beyond loopback (loopback is of no use to another machine, and IPv6
//! link-local ones are left out on both sides: without an interface named
//! they cannot be dialled), its port, and a TXT record `fp=sha256:…`, its
//! certificate's fingerprint. mdns-sd sends on each interface only the
//! addresses in that interface's subnet, so a hive hears the ones it can
//! reach. A hive whose join token names no address (or none that answers)
//! listens for announcements a few seconds and tries the queens whose
//! fingerprint is the token's; anyone may announce anything, so the
//! fingerprint, checked again by the TLS handshake, is what counts.
//!
//! The instance name is the host name made a DNS label, with the start of
//! the fingerprint after it: machines cloned from one image share a host
//! name, and so do network namespaces, but not a queen identity.
//! mdns-sd runs its own thread and sockets (one per interface address); it
//! is shut down when an announcement or a browse ends, since dropping its
//! handle alone leaves the thread running.

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The DNS-SD service type queens announce.
pub const SERVICE: &str = "_rbee._tcp.local.";

/// The TXT key holding the queen's fingerprint.
const FINGERPRINT_KEY: &str = "fp";

/// How long a withdrawn announcement waits for mdns-sd to say its goodbye
/// went out; it takes a millisecond or so, the bound is for a stuck daemon.
const GOODBYE: Duration = Duration::from_millis(250);

/// A queen's announcement on the LAN, withdrawn when dropped.
pub struct Announcement {
    daemon: ServiceDaemon,
    fullname: String,
}

impl Drop for Announcement {
    fn drop(&mut self) {
        // mdns-sd sends the goodbye (TTL 0) before it answers the unregister:
        // waiting for the answer keeps a process that exits right after from
        // cutting it off, so hives forget this queen at once, not in 75 min.
        if let Ok(said) = self.daemon.unregister(&self.fullname) {
            let _ = said.recv_timeout(GOODBYE);
        }
        // Only queues the command: nothing waits on the daemon's thread here.
        let _ = self.daemon.shutdown();
    }
}

/// Announces a queen listening on `port` at this machine's addresses beyond
/// loopback, whose certificate fingerprint is `fingerprint` (`sha256:…`),
/// under a DNS-SD instance name made from `name`, the machine's host name.
pub fn announce(name: &str, port: u16, fingerprint: &str) -> Result<Announcement, String> {
    let fingerprint = well_formed(fingerprint)
        .ok_or_else(|| format!("not a certificate fingerprint: {fingerprint:?}"))?;
    let addresses = addresses();
    if addresses.is_empty() {
        return Err("this machine has no address beyond loopback".into());
    }
    let instance = instance_name(name, &fingerprint);
    let properties = [(FINGERPRINT_KEY, fingerprint.as_str())];
    let mut info = ServiceInfo::new(
        SERVICE,
        &instance,
        &format!("{instance}.local."),
        &addresses[..],
        port,
        &properties[..],
    )
    .map_err(|e| format!("mDNS: {e}"))?;
    // Probing for a name in use (RFC 6762 8.1) holds the announcement back
    // about 2 s; the names carry the fingerprint, so only this identity could
    // hold them, and a queen is found as soon as it starts.
    info.set_requires_probe(false);
    let fullname = info.get_fullname().to_string();
    let daemon = ServiceDaemon::new().map_err(|e| format!("mDNS: {e}"))?;
    if let Err(e) = daemon.register(info) {
        let _ = daemon.shutdown();
        return Err(format!("mDNS: {e}"));
    }
    tracing::info!("announced on the LAN as {fullname} (mDNS)");
    Ok(Announcement { daemon, fullname })
}

/// A queen heard on the LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Its DNS-SD instance name.
    pub name: String,
    /// Where it listens: each of its addresses beyond loopback, with its
    /// port (IPv4 first).
    pub addrs: Vec<SocketAddr>,
    /// Its certificate's fingerprint, `sha256:` and 64 lowercase hex digits.
    pub fingerprint: String,
}

/// The queens that answer within `wait`, one per fingerprint. Without
/// multicast (no address beyond loopback) the list is empty and a warning
/// says why.
pub async fn browse(wait: Duration) -> Vec<Found> {
    const CANNOT: &str = "cannot look for queens on the LAN (mDNS)";
    if addresses().is_empty() {
        tracing::warn!("{CANNOT}: this machine has no address beyond loopback");
        return Vec::new();
    }
    let daemon = match ServiceDaemon::new() {
        Ok(daemon) => daemon,
        Err(e) => {
            tracing::warn!("{CANNOT}: {e}");
            return Vec::new();
        }
    };
    let events = match daemon.browse(SERVICE) {
        Ok(events) => events,
        Err(e) => {
            tracing::warn!("{CANNOT}: {e}");
            let _ = daemon.shutdown();
            return Vec::new();
        }
    };
    let deadline = tokio::time::Instant::now() + wait;
    let mut found = Vec::new();
    // A queen may be resolved more than once (each interface, each address
    // record that arrives later): every resolution is merged.
    while let Ok(Ok(event)) = tokio::time::timeout_at(deadline, events.recv_async()).await {
        if let ServiceEvent::ServiceResolved(info) = event {
            heard(&mut found, &info);
        }
    }
    // The daemon may be blocked handing `events` an event; it is dropped
    // with this function, which lets the daemon go on to the shutdown.
    let _ = daemon.shutdown();
    found
}

/// The addresses of the queens in `found` whose fingerprint is `fingerprint`.
pub fn matching(found: &[Found], fingerprint: &str) -> Vec<SocketAddr> {
    found
        .iter()
        .filter(|f| f.fingerprint.eq_ignore_ascii_case(fingerprint))
        .flat_map(|f| f.addrs.iter().copied())
        .collect()
}

/// Adds what one announcement said to `found`: one entry per well-formed
/// fingerprint, its usable addresses merged, IPv4 first.
fn heard(found: &mut Vec<Found>, info: &ServiceInfo) {
    let fp = info.get_property_val_str(FINGERPRINT_KEY);
    let Some(fingerprint) = fp.and_then(well_formed) else {
        return;
    };
    let index = match found.iter().position(|f| f.fingerprint == fingerprint) {
        Some(i) => i,
        None => {
            let fullname = info.get_fullname();
            let suffix = format!(".{SERVICE}");
            let name = fullname.strip_suffix(&suffix).unwrap_or(fullname);
            found.push(Found {
                name: name.to_string(),
                addrs: Vec::new(),
                fingerprint,
            });
            found.len() - 1
        }
    };
    let entry = &mut found[index];
    for ip in info.get_addresses().iter().filter(|ip| usable(ip)) {
        let addr = SocketAddr::new(*ip, info.get_port());
        if !entry.addrs.contains(&addr) {
            entry.addrs.push(addr);
        }
    }
    entry.addrs.sort_by_key(|a| (a.is_ipv6(), *a));
}

/// `fingerprint` in lowercase when it is `sha256:` and 64 hex digits.
fn well_formed(fingerprint: &str) -> Option<String> {
    let hex = fingerprint.strip_prefix("sha256:")?;
    let ok = hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then(|| fingerprint.to_ascii_lowercase())
}

/// An address another machine could dial.
fn usable(ip: &IpAddr) -> bool {
    let link_local_v6 = matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
    !ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast() && !link_local_v6
}

/// This machine's usable addresses.
fn addresses() -> Vec<IpAddr> {
    let mut all: Vec<IpAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip())
        .filter(usable)
        .collect();
    all.sort_by_key(|ip| (ip.is_ipv6(), *ip));
    all.dedup();
    all
}

/// A DNS label (letters, digits, `-`; at most 63) from a host name, with
/// the first 8 hex digits of the (well-formed) fingerprint after it.
fn instance_name(host: &str, fingerprint: &str) -> String {
    let host: String = host
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let mut host: String = host.trim_matches('-').chars().take(54).collect();
    if host.is_empty() {
        host = "rbee-queen".into();
    }
    let short = fingerprint.get(7..15).unwrap_or_default();
    format!("{}-{short}", host.trim_end_matches('-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(byte: &str) -> String {
        format!("sha256:{}", byte.repeat(32))
    }

    /// What a queen named `name` announcing `addrs` and `txt` resolves to.
    fn info(name: &str, addrs: &str, txt: &[(&str, &str)]) -> ServiceInfo {
        ServiceInfo::new(SERVICE, name, "q.local.", addrs, 8500, txt).unwrap()
    }

    #[test]
    fn announcements_are_merged_by_fingerprint_and_bad_ones_left_out() {
        let a1 = fp("A1");
        let cases = [
            ("q-a1a1a1a1", "fd00::1,127.0.0.1,fe80::1,10.0.0.9", "fp", a1),
            ("again", "10.0.0.5,fd00::1", "FP", fp("a1")),
            ("short", "10.0.0.6", "fp", "sha256:abcd".to_string()),
            ("not-hex", "10.0.0.6", "fp", fp("zz")),
            ("other-key", "10.0.0.7", "id", fp("b2")),
        ];
        let mut found = Vec::new();
        for (name, addrs, key, value) in &cases {
            heard(&mut found, &info(name, addrs, &[(key, value.as_str())]));
        }
        heard(&mut found, &info("none", "10.0.0.7", &[]));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "q-a1a1a1a1");
        assert_eq!(found[0].fingerprint, fp("a1"));
        let want: Vec<SocketAddr> = ["10.0.0.5:8500", "10.0.0.9:8500", "[fd00::1]:8500"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(found[0].addrs, want);
        assert_eq!(matching(&found, &fp("A1")), want);
        assert!(matching(&found, &fp("b2")).is_empty());
    }

    #[test]
    fn a_host_name_becomes_an_instance_label() {
        let fp = fp("0f");
        let mac = instance_name("mac.home.arpa", &fp);
        assert_eq!(mac, "mac-home-arpa-0f0f0f0f");
        assert_eq!(instance_name("__", &fp), "rbee-queen-0f0f0f0f");
        assert_eq!(instance_name("Büro PC", &fp), "B-ro-PC-0f0f0f0f");
        assert_eq!(instance_name(&"x".repeat(80), &fp).len(), 63);
        let dash_at_the_cut = format!("{}-y", "x".repeat(53));
        assert_eq!(instance_name(&dash_at_the_cut, &fp).len(), 62);
    }

    #[test]
    fn only_a_well_formed_fingerprint_is_announced() {
        assert!(announce("q", 8500, "sha256:ab").is_err());
        assert!(announce("q", 8500, &format!("md5:{}", "ab".repeat(32))).is_err());
    }
}
