//! The dependency rule (ARCHITECTURE.md, "Invariants"), checked on the
//! sources: roles depend only downward. A role (`keeper/`, `queen/`, `hive/`,
//! `worker/`) uses no other role; what two roles share (the protocol, model
//! references, worker flags a hive passes, environment variable names, disk
//! and machine facts) lives below them, and nothing below uses a role. Only
//! the entry (`main.rs`, `cli.rs`, `lib.rs`) names roles, to start one.

use std::path::{Path, PathBuf};

const ROLES: &[&str] = &["keeper", "queen", "hive", "worker"];
/// The entry, which starts roles, and this file, whose cases name them.
const EXEMPT: &[&str] = &["main", "cli", "lib", "layers"];

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            all.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            all.push(path);
        }
    }
    all
}

/// The module path of a file under src/: `hive/workers.rs` is
/// `[hive, workers]`, `hive/mod.rs` is `[hive]`.
fn module_of(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// The top-level modules a line of code names through `crate::` or `super::`
/// (seen from `module`), comments left out.
fn named_tops(line: &str, module: &[String]) -> Vec<String> {
    let code = line.split("//").next().unwrap_or_default();
    let mut tops = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let after = &code[at + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        tops.push(name);
    }
    let mut rest = code;
    while let Some(at) = rest.find("super::") {
        // Only where a path starts (not inside `crate::a::super`, which is not Rust anyway).
        let before = rest[..at].chars().last();
        let mut after = &rest[at..];
        let mut ups = 0;
        while let Some(more) = after.strip_prefix("super::") {
            ups += 1;
            after = more;
        }
        let name: String = after
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if before.is_none_or(|c| !c.is_alphanumeric() && c != ':') && ups <= module.len() {
            let mut path: Vec<String> = module[..module.len() - ups].to_vec();
            path.push(name);
            tops.push(path[0].clone());
        }
        rest = after;
    }
    tops
}

/// Each use of a role from where the rule forbids it: `file:line: names ROLE`.
fn violations(src: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for file in sources(src) {
        let relative = file.strip_prefix(src).expect("under src/").to_path_buf();
        let module = module_of(&relative);
        let own = module.first().cloned().unwrap_or_default();
        if EXEMPT.contains(&own.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("a source file");
        for (n, line) in text.lines().enumerate() {
            for top in named_tops(line, &module) {
                if ROLES.contains(&top.as_str()) && top != own {
                    found.push(format!("{}:{}: names {top}", relative.display(), n + 1));
                }
            }
        }
    }
    found
}

#[test]
fn roles_depend_only_downward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src);
    assert!(
        found.is_empty(),
        "a role is used from where the dependency rule (ARCHITECTURE.md) forbids it; move the \
         shared fact below the roles (protocol/, model_ref.rs, …):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_sees_crate_and_super_paths() {
    let m = |s: &str| s.split('/').map(String::from).collect::<Vec<_>>();
    assert_eq!(
        named_tops("use crate::worker::engine;", &m("hive/state")),
        ["worker"]
    );
    assert_eq!(
        named_tops(
            "    let x = super::super::queen::X; // crate::hive",
            &m("hive/a")
        ),
        ["queen"]
    );
    assert_eq!(
        named_tops("use super::workers;", &m("hive/state")),
        ["hive"]
    );
    assert!(named_tops("// crate::queen", &m("hive/state")).is_empty());
}
