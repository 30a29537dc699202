//! The dependency rule (ARCHITECTURE.md, "Invariants"), checked on the
//! sources: roles depend only downward. A role (`keeper/`, `queen/`, `hive/`,
//! `worker/`) uses no other role; what two roles share (the protocol, model
//! references, worker flags a hive passes, environment variable names, disk
//! and machine facts) lives below them, and nothing below uses a role. Only
//! the entry (`main.rs`, `cli.rs`, `lib.rs`) names roles, to start one.
//! And no function outside the tests is longer than a screen (80 lines): a
//! longer one becomes named steps.

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

/// The most lines a function may take, its signature and closing brace included.
const SCREEN: usize = 80;

/// Where a function starts on `line`: its indentation, if it is one.
fn function_at(line: &str) -> Option<usize> {
    let code = line.trim_start();
    let indent = line.len() - code.len();
    let mut rest = code;
    for prefix in [
        "pub(crate) ",
        "pub(super) ",
        "pub ",
        "const ",
        "async ",
        "unsafe ",
        "extern \"C\" ",
    ] {
        rest = rest.strip_prefix(prefix).unwrap_or(rest);
    }
    rest.starts_with("fn ").then_some(indent)
}

/// Each function of `text` longer than [`SCREEN`], `#[test]`s left out: its
/// first line (1-based) and length.
fn long_functions(text: &str) -> Vec<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut long = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(indent) = function_at(line) else {
            continue;
        };
        let test = lines[i.saturating_sub(3)..i]
            .iter()
            .any(|l| l.trim() == "#[test]" || l.trim().starts_with("#[tokio::test"));
        // The body opens on the signature's last line; a declaration has none.
        let Some(open) =
            (i..lines.len()).find(|&k| lines[k].contains('{') || lines[k].ends_with(';'))
        else {
            continue;
        };
        let one_line = lines[open].matches('{').count() == lines[open].matches('}').count();
        if test || !lines[open].contains('{') || one_line {
            continue;
        }
        let closing = format!("{}}}", " ".repeat(indent));
        let end = (open..lines.len()).find(|&k| lines[k] == closing);
        if let Some(end) = end.filter(|&end| end + 1 - i > SCREEN) {
            long.push((i + 1, end + 1 - i));
        }
    }
    long
}

#[test]
fn no_function_is_longer_than_a_screen() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    for file in sources(&src) {
        let text = std::fs::read_to_string(&file).expect("a source file");
        for (line, length) in long_functions(&text) {
            let relative = file.strip_prefix(&src).expect("under src/").display();
            found.push(format!("{relative}:{line}: {length} lines"));
        }
    }
    assert!(
        found.is_empty(),
        "functions longer than {SCREEN} lines: make them named steps\n{}",
        found.join("\n")
    );
}

#[test]
fn the_length_check_counts_bodies_not_declarations_or_tests() {
    let body = |n: usize| "    let x = 1;\n".repeat(n);
    let long = format!("pub async fn f(\n    a: u8,\n) -> u8 {{\n{}}}\n", body(80));
    assert_eq!(long_functions(&long), [(1, 84)]);
    let short = format!("fn f() {{\n{}}}\n", body(78));
    assert!(long_functions(&short).is_empty());
    let test = format!("#[test]\nfn t() {{\n{}}}\n", body(100));
    assert!(long_functions(&test).is_empty());
    assert!(long_functions("extern \"C\" {\n    fn g(x: i32) -> i32;\n}\n").is_empty());
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
