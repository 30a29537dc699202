//! Model references (DESIGN.md §4), parsed without touching disk or network.

use crate::protocol::{ApiError, ErrorCode};
use std::path::PathBuf;

/// The reference, or `INVALID_MODEL_REF` saying what is wrong with it: the
/// check every role makes at its door, before anything is fetched.
pub fn check(model_ref: &str) -> Result<ModelRef, ApiError> {
    ModelRef::parse(model_ref).map_err(|m| ApiError {
        param: Some("model".into()),
        ..ApiError::new(ErrorCode::InvalidModelRef, m)
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// A Hugging Face repository, and which of its GGUF files.
    HuggingFace { repo: String, pick: HfPick },
    /// A file on this machine, registered in place.
    File(PathBuf),
    /// The catalog name of a model this hive already has.
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HfPick {
    /// The repo's Q4_K_M file, else its only `.gguf`.
    Default,
    /// The file whose name contains this quantization, case-insensitively.
    Quant(String),
    /// This exact file.
    File(String),
}

impl ModelRef {
    pub fn parse(s: &str) -> Result<ModelRef, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("model_ref is empty".into());
        }
        if let Some(rest) = s.strip_prefix("hf:") {
            return parse_hf(rest).ok_or_else(|| {
                format!(
                    "cannot read {s:?}: expected hf:ORG/REPO, hf:ORG/REPO:QUANT or hf:ORG/REPO/FILE.gguf"
                )
            });
        }
        if let Some(path) = s.strip_prefix("file:") {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(format!("{s:?}: a file: reference needs an absolute path"));
            }
            return Ok(ModelRef::File(path));
        }
        if s.to_ascii_lowercase().ends_with(".gguf") {
            return Ok(ModelRef::File(PathBuf::from(s)));
        }
        if s.contains('/') || s.contains(char::is_whitespace) {
            return Err(format!(
                "{s:?} is not a model reference: use hf:ORG/REPO[:QUANT], file:/path/model.gguf, or a catalog name"
            ));
        }
        Ok(ModelRef::Name(s.to_lowercase()))
    }
}

fn parse_hf(rest: &str) -> Option<ModelRef> {
    let valid = |part: &str| {
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && part != "."
            && part != ".."
    };
    let (repo_part, quant) = match rest.split_once(':') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let parts: Vec<&str> = repo_part.split('/').collect();
    let (org, name, file) = match parts.as_slice() {
        [org, name] => (*org, *name, None),
        [org, name, file] => (*org, *name, Some(*file)),
        _ => return None,
    };
    if !valid(org) || !valid(name) {
        return None;
    }
    let pick = match (file, quant) {
        (Some(f), None) if valid(f) && f.to_ascii_lowercase().ends_with(".gguf") => {
            HfPick::File(f.to_string())
        }
        (None, Some(q)) if valid(q) => HfPick::Quant(q.to_string()),
        (None, None) => HfPick::Default,
        _ => return None,
    };
    Some(ModelRef::HuggingFace {
        repo: format!("{org}/{name}"),
        pick,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hf(repo: &str, pick: HfPick) -> ModelRef {
        ModelRef::HuggingFace {
            repo: repo.into(),
            pick,
        }
    }

    #[test]
    fn every_form_of_design_section_4() {
        assert_eq!(
            ModelRef::parse("hf:TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF").unwrap(),
            hf("TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF", HfPick::Default)
        );
        assert_eq!(
            ModelRef::parse("hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1").unwrap(),
            hf(
                "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
                HfPick::Quant("Q4_1".into())
            )
        );
        assert_eq!(
            ModelRef::parse("hf:org/repo/model.Q8_0.gguf").unwrap(),
            hf("org/repo", HfPick::File("model.Q8_0.gguf".into()))
        );
        assert_eq!(
            ModelRef::parse("file:/models/x.gguf").unwrap(),
            ModelRef::File("/models/x.gguf".into())
        );
        assert_eq!(
            ModelRef::parse("models/x.GGUF").unwrap(),
            ModelRef::File("models/x.GGUF".into())
        );
        assert_eq!(
            ModelRef::parse("SmolLM2-135M-Instruct.Q4_1").unwrap(),
            ModelRef::Name("smollm2-135m-instruct.q4_1".into())
        );
    }

    #[test]
    fn malformed_references_say_what_is_expected() {
        for bad in [
            "",
            "hf:",
            "hf:onlyorg",
            "hf:a/b/c/d.gguf",
            "hf:a/b/notgguf.bin",
            "hf:a/../b",
            "hf:a/b:",
            "hf:a/b/c.gguf:Q4",
            "file:relative.gguf",
            "some/thing",
            "two words",
        ] {
            assert!(ModelRef::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(ModelRef::parse("hf:x").unwrap_err().contains("hf:ORG/REPO"));
    }
}
