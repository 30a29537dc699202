//! A join token (issue 28): the one line `rbee keeper join-token` prints and
//! `rbee hive --join` takes, read by both roles, so its format is here.
//!
//! `rbee1:<fingerprint>:<secret>[@<address>,<address>…]`: the queen's
//! certificate fingerprint (its 64 hex digits; the hive accepts only that
//! certificate), a random secret the hive proves (the queen keeps only its
//! hash), and the addresses the queen listens on (`host:port`). Without
//! addresses the hive finds the queen on the LAN by its fingerprint (mDNS).
//! Plain text rather than encoded: a person can read what they paste.

/// What a join token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// `sha256:` and 64 hex digits.
    pub fingerprint: String,
    pub secret: String,
    /// `host:port`, as a URL's authority.
    pub addresses: Vec<String>,
}

const PREFIX: &str = "rbee1:";

impl JoinToken {
    pub fn encode(&self) -> String {
        let hex = self
            .fingerprint
            .strip_prefix("sha256:")
            .unwrap_or(&self.fingerprint);
        let mut token = format!("{PREFIX}{hex}:{}", self.secret);
        if !self.addresses.is_empty() {
            token.push('@');
            token.push_str(&self.addresses.join(","));
        }
        token
    }

    pub fn decode(given: &str) -> Result<JoinToken, String> {
        let bad = |why: &str| {
            format!(
                "not a join token ({why}): it looks like rbee1:…, as `rbee keeper join-token` \
                 prints it on the queen's machine"
            )
        };
        let rest = given
            .trim()
            .strip_prefix(PREFIX)
            .ok_or_else(|| bad("no rbee1: at its start"))?;
        let (keys, addresses) = rest.split_once('@').unwrap_or((rest, ""));
        let (hex, secret) = keys
            .split_once(':')
            .ok_or_else(|| bad("no secret after the fingerprint"))?;
        let is_hex =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_hex(hex, 64) {
            return Err(bad("its fingerprint is not 64 hex digits"));
        }
        if !is_hex(secret, 32) {
            return Err(bad("its secret is not 32 hex digits"));
        }
        let addresses: Vec<String> = addresses
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(a) = addresses
            .iter()
            .find(|a| format!("https://{a}").parse::<hyper::Uri>().is_err())
        {
            return Err(bad(&format!("{a:?} is not an address")));
        }
        Ok(JoinToken {
            fingerprint: format!("sha256:{}", hex.to_ascii_lowercase()),
            secret: secret.to_ascii_lowercase(),
            addresses,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_back_as_it_was_written() {
        let t = JoinToken {
            fingerprint: format!("sha256:{}", "ab".repeat(32)),
            secret: "0f".repeat(16),
            addresses: vec!["10.0.0.5:8500".into(), "[fd00::5]:8500".into()],
        };
        let line = t.encode();
        assert!(line.starts_with("rbee1:abab"), "{line}");
        assert_eq!(JoinToken::decode(&format!(" {line}\n")), Ok(t.clone()));
        let bare = JoinToken {
            addresses: vec![],
            ..t
        };
        assert_eq!(JoinToken::decode(&bare.encode()), Ok(bare.clone()));
        assert!(!bare.encode().contains('@'));
    }

    #[test]
    fn what_is_not_a_token_says_why() {
        let fp = "ab".repeat(32);
        let secret = "0f".repeat(16);
        for (given, why) in [
            ("K10abc::server:secret".to_string(), "no rbee1:"),
            (format!("rbee1:{fp}"), "no secret"),
            (format!("rbee1:{}:{secret}", &fp[2..]), "fingerprint"),
            (format!("rbee1:{fp}:short"), "secret"),
            (
                format!("rbee1:{fp}:{secret}@a b:1"),
                "\"a b:1\" is not an address",
            ),
        ] {
            let e = JoinToken::decode(&given).unwrap_err();
            assert!(e.contains(why) && e.contains("join-token"), "{given}: {e}");
        }
    }
}
