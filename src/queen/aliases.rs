//! Short names for models (`rbee keeper alias smollm2 smollm2-135m-instruct.q4_1`),
//! kept by the queen in a store of their own (opened the first time one is
//! set, so a queen without aliases never opens it) and read by every front
//! before anything else: an alias is a name people type, its model the
//! reference the cluster routes by.

use crate::protocol::{Alias, ApiError, ErrorCode};
use crate::store::{Lazy, Store};
use std::path::{Path, PathBuf};

pub struct Aliases {
    store: Lazy,
    path: PathBuf,
}

/// The longest alias.
const MAX_NAME: usize = 64;

impl Aliases {
    pub fn open(data_dir: &Path) -> Result<Aliases, String> {
        let path = data_dir.join("queen-aliases");
        let recovery = format!(
            "Move it away (mv {0} {0}.damaged; mv {0}.check {0}.check.damaged), start the \
             queen again and set the aliases again (rbee keeper alias NAME MODEL)",
            path.display()
        );
        let store = Lazy::open(&path, "model aliases", "queen", &recovery)?;
        Ok(Aliases { store, path })
    }

    fn store(&self) -> Result<&Store, ApiError> {
        self.store.get().map_err(ApiError::internal)
    }

    /// Whether any alias was ever set (else the store stays unopened).
    fn any(&self) -> bool {
        self.store.opened().is_some() || self.path.exists()
    }

    /// The model `given` names: an alias's model, else `given` itself, in the
    /// one spelling the cluster routes by (`model_ref::canonical`).
    pub fn resolve(&self, given: &str) -> Result<String, ApiError> {
        if self.any() {
            for key in keys(given) {
                if let Some(alias) = self.store()?.get::<Alias>(&key) {
                    return crate::model_ref::canonical(&alias.model);
                }
            }
        }
        crate::model_ref::canonical(given)
    }

    pub fn list(&self) -> Result<Vec<Alias>, ApiError> {
        if !self.any() {
            return Ok(Vec::new());
        }
        let mut all: Vec<Alias> = self.store()?.list();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    /// Names `model` `name` (again, if it named another).
    pub fn set(&self, name: &str, model: &str) -> Result<Alias, ApiError> {
        let name = check_name(name)?;
        let model = crate::model_ref::canonical(model)?;
        if crate::model_ref::canonical(&name).is_ok_and(|c| c == model) {
            return Err(ApiError::invalid(
                "name",
                format!("{name} already names {model}"),
            ));
        }
        let alias = Alias {
            name: name.clone(),
            model,
        };
        self.store()?
            .put(&name, &alias)
            .map_err(ApiError::internal)?;
        Ok(alias)
    }

    pub fn remove(&self, name: &str) -> Result<Alias, ApiError> {
        if self.any() {
            for key in keys(name) {
                let gone = self
                    .store()?
                    .remove::<Alias>(&key)
                    .map_err(ApiError::internal)?;
                if let Some(alias) = gone {
                    return Ok(alias);
                }
            }
        }
        Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no alias {name:?}"),
        ))
    }
}

/// The keys an alias typed as `given` may be stored under: as typed, and
/// without Ollama's `:latest` (what /api/tags lists for an alias without a tag).
fn keys(given: &str) -> Vec<String> {
    let key = given.trim().to_lowercase();
    if key.is_empty() {
        return Vec::new();
    }
    let plain = crate::model_ref::canonical(&key).ok().filter(|p| *p != key);
    std::iter::once(key).chain(plain).collect()
}

/// An alias as people type a model's name: letters, digits and `.`, `_`,
/// `-`, `:` (Ollama's `llama3.2:1b`), lower-case, no path or reference.
fn check_name(name: &str) -> Result<String, ApiError> {
    let name = name.trim().to_lowercase();
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-:".contains(c))
        && !name.starts_with("hf:")
        && !name.starts_with("file:")
        && !name.ends_with(".gguf");
    match ok {
        true => Ok(name),
        false => Err(ApiError::invalid(
            "name",
            format!(
                "{name:?} cannot be an alias: up to {MAX_NAME} letters, digits, '.', '_', '-' or ':', \
                 and not a reference itself (hf:…, file:…, *.gguf)"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_alias_names_a_model_until_removed() {
        let dir = std::env::temp_dir().join(format!("rbee-aliases-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let aliases = Aliases::open(&dir).unwrap();
        assert_eq!(
            aliases.resolve("smollm2").unwrap(),
            "smollm2",
            "no alias: the name itself"
        );
        assert!(
            !dir.join("queen-aliases").exists(),
            "nothing opened before an alias is set"
        );
        let set = aliases
            .set(
                "SmolLM2",
                "hf.co/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1",
            )
            .unwrap();
        assert_eq!(set.name, "smollm2");
        for typed in ["smollm2", "SmolLM2:latest"] {
            assert_eq!(
                aliases.resolve(typed).unwrap(),
                "hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1",
                "{typed}"
            );
        }
        aliases
            .set("smol:tiny", "smollm2-135m-instruct:q4_1")
            .unwrap();
        assert_eq!(
            aliases.resolve("Smol:Tiny").unwrap(),
            "smollm2-135m-instruct.q4_1"
        );
        assert_eq!(aliases.list().unwrap().len(), 2);
        for bad in ["", "a/b", "hf:x", "x.gguf", "two words"] {
            assert!(aliases.set(bad, "m").is_err(), "{bad:?}");
        }
        assert!(aliases.set("x", "not/a/ref/at/all").is_err());
        aliases.remove("smollm2").unwrap();
        assert_eq!(aliases.resolve("smollm2").unwrap(), "smollm2");
        assert!(aliases.remove("smollm2").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
