//! What the keeper remembers between calls: the queen's URL, the token file
//! and a default model, in a small TOML file (`rbee keeper config set|get|unset`).
//!
//! It lives at `$RBEE_HOME/config.toml` when RBEE_HOME is set (a home of its
//! own, as the tests and a second cluster use), else
//! `$XDG_CONFIG_HOME/rbee/config.toml`, else in the data dir.
//! Flags and environment variables beat the file.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The file's contents; every key optional.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Written `queen_url`; `queen-url`, as `config set` names it, is read too.
    #[serde(default, alias = "queen-url", skip_serializing_if = "Option::is_none")]
    pub queen_url: Option<String>,
    #[serde(default, alias = "token-file", skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The certificate fingerprint of each queen reached over TLS, by its
    /// `host:port`: pinned at the first contact.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub queen_pins: std::collections::BTreeMap<String, String>,
}

/// The keys, as written on the command line.
pub const KEYS: &[&str] = &["queen-url", "token-file", "model"];

/// Where the config file is.
pub fn path() -> PathBuf {
    let rbee_home = std::env::var_os("RBEE_HOME").filter(|h| !h.is_empty());
    let xdg = std::env::var_os("XDG_CONFIG_HOME").filter(|h| !h.is_empty());
    match (rbee_home, xdg) {
        (None, Some(xdg)) => Path::new(&xdg).join("rbee/config.toml"),
        _ => crate::data_dir(None).join("config.toml"),
    }
}

impl Config {
    /// The file at `path`; none there is an empty config, a damaged one an error.
    pub fn load(path: &Path) -> Result<Config, String> {
        match crate::read_small_file(path, 64 * 1024) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| format!("{} is not a valid config file: {e}", path.display())),
            Err(None) => Ok(Config::default()),
            Err(Some(e)) => Err(e),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let text = toml::to_string(self).map_err(|e| format!("cannot write the config: {e}"))?;
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Result<Option<String>, String> {
        Ok(match key_of(key)? {
            "queen-url" => self.queen_url.clone(),
            "token-file" => self.token_file.as_ref().map(|p| p.display().to_string()),
            _ => self.model.clone(),
        })
    }

    /// Sets `key` (`None` unsets it). A token file is made absolute and must
    /// exist; a queen URL must be one.
    pub fn set(&mut self, key: &str, value: Option<&str>) -> Result<(), String> {
        match key_of(key)? {
            "queen-url" => {
                self.queen_url = value.map(super::queen::queen_url).transpose()?;
            }
            "token-file" => {
                self.token_file = match value {
                    Some(file) => Some(
                        std::fs::canonicalize(file)
                            .map_err(|e| format!("cannot use token file {file}: {e}"))?,
                    ),
                    None => None,
                }
            }
            _ => self.model = value.map(str::to_string),
        }
        Ok(())
    }
}

/// The key as the file spells it, or which keys there are.
fn key_of(key: &str) -> Result<&'static str, String> {
    let wanted = key.replace('_', "-");
    KEYS.iter()
        .find(|k| **k == wanted)
        .copied()
        .ok_or_else(|| format!("unknown config key {key:?}: use {}", KEYS.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_set_is_saved_loaded_and_unset() {
        let dir = std::env::temp_dir().join(format!("rbee-config-{}", std::process::id()));
        let file = dir.join("sub/config.toml");
        assert_eq!(Config::load(&file), Ok(Config::default()));
        let mut c = Config::default();
        c.set("queen-url", Some("http://mac.home.arpa:8500/"))
            .unwrap();
        c.set("model", Some("smollm2-135m-instruct.q4_1")).unwrap();
        c.save(&file).unwrap();
        let loaded = Config::load(&file).unwrap();
        assert_eq!(loaded, c);
        assert_eq!(
            loaded.get("queen_url").unwrap().as_deref(),
            Some("https://mac.home.arpa:8500")
        );
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.contains("model = \"smollm2-135m-instruct.q4_1\""),
            "{text}"
        );
        c.set("model", None).unwrap();
        assert_eq!(c.get("model"), Ok(None));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_keys_values_and_files_are_refused_saying_why() {
        let mut c = Config::default();
        assert_eq!(
            c.set("modle", Some("x")),
            Err("unknown config key \"modle\": use queen-url, token-file, model".into())
        );
        assert!(c
            .set("queen-url", Some("mac:port"))
            .unwrap_err()
            .contains("is not an address"));
        // The OLLAMA_HOST habit: no scheme is http://.
        c.set("queen-url", Some("mac:8500")).unwrap();
        assert_eq!(c.queen_url.as_deref(), Some("https://mac:8500"));
        assert!(c
            .set("token-file", Some("/no/such/token"))
            .unwrap_err()
            .contains("/no/such/token"));
        let dir = std::env::temp_dir().join(format!("rbee-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.toml");
        std::fs::write(&file, "queen_url = 3\n").unwrap();
        assert!(Config::load(&file)
            .unwrap_err()
            .contains("is not a valid config file"));
        // A config that is a FIFO or a device is refused at once, not read forever.
        let fifo = dir.join("fifo.toml");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        assert!(Config::load(&fifo)
            .unwrap_err()
            .contains("is not a regular file"));
        assert!(Config::load(Path::new("/dev/zero"))
            .unwrap_err()
            .contains("is not a regular file"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn keys_are_read_as_the_readme_writes_them() {
        let c: Config =
            toml::from_str("queen-url = \"http://mac:8500\"\ntoken-file = \"/t\"\n").unwrap();
        assert_eq!(c.queen_url.as_deref(), Some("http://mac:8500"));
        assert_eq!(c.token_file.as_deref(), Some(Path::new("/t")));
    }
}
