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

/// The one spelling of a reference, whichever form it was written in
/// (`hf.co/ORG/REPO:Q` is `hf:ORG/REPO:Q`, `NAME:TAG` the catalog name
/// `name.tag`): what the queen routes by and hives record.
pub fn canonical(model_ref: &str) -> Result<String, ApiError> {
    Ok(match check(model_ref)? {
        ModelRef::HuggingFace { repo, pick } => match pick {
            HfPick::Default => format!("hf:{repo}"),
            HfPick::Quant(q) => format!("hf:{repo}:{q}"),
            HfPick::File(f) => format!("hf:{repo}/{f}"),
        },
        ModelRef::File(_) => model_ref.trim().to_string(),
        ModelRef::Name(name) => name,
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
        // Hugging Face's and Ollama's forms: hf.co/ORG/REPO[:QUANT], ORG/REPO[:QUANT].
        let hub = ["hf.co/", "huggingface.co/", "https://huggingface.co/"]
            .iter()
            .find_map(|p| s.strip_prefix(p));
        if let Some(repo) = hub.or_else(|| (s.matches('/').count() == 1).then_some(s)) {
            if let Some(hf) = parse_hf(repo).filter(|_| !s.contains(char::is_whitespace)) {
                return Ok(hf);
            }
        }
        if s.contains('/') || s.contains(char::is_whitespace) {
            return Err(format!(
                "{s:?} is not a model reference: use hf:ORG/REPO[:QUANT], hf.co/ORG/REPO[:QUANT], file:/path/model.gguf, or a catalog name"
            ));
        }
        // NAME:TAG, as Ollama's clients write it, is the catalog name NAME.TAG
        // (NAME:latest, NAME).
        let name = s.to_lowercase();
        Ok(ModelRef::Name(match name.rsplit_once(':') {
            Some((base, "latest")) => base.to_string(),
            Some((base, tag)) => format!("{base}.{tag}"),
            None => name,
        }))
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
    fn ollamas_and_hugging_faces_forms_are_the_same_references() {
        let smol = "hf:HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1";
        for same in [
            "hf.co/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1",
            "huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1",
            "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1",
            smol,
        ] {
            assert_eq!(canonical(same).unwrap(), smol, "{same}");
        }
        assert_eq!(canonical("org/repo").unwrap(), "hf:org/repo");
        assert_eq!(
            canonical("SmolLM2-135M-Instruct:Q4_1").unwrap(),
            "smollm2-135m-instruct.q4_1"
        );
        assert_eq!(canonical("smollm2:latest").unwrap(), "smollm2");
        assert_eq!(canonical("/m/x.gguf").unwrap(), "/m/x.gguf");
        assert_eq!(canonical("file:/m/x.gguf").unwrap(), "file:/m/x.gguf");
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
            "some/thing/more",
            "hf.co/onlyorg",
            "two words",
        ] {
            assert!(ModelRef::parse(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(ModelRef::parse("hf:x").unwrap_err().contains("hf:ORG/REPO"));
    }
}
