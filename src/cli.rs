//! The command line's forgiving parts, around argh: `-h` everywhere, the
//! keeper's global options wherever they are written, `--opt=value`, and
//! errors that say what was probably meant and where to read more.
//!
//! argh stays the one parser: "did you mean" reads its candidates from the
//! help argh prints for the command the error happened in, so a new flag or
//! command is suggested without being listed twice.

use crate::keeper::{GLOBAL_OPTIONS, OWN_OPTIONS};

/// argv (program name first) as argh should read it. Before a `--`: `-h` is
/// `--help`, a lone `-` is `--stdin`, `--opt=value` is two words; after
/// `keeper`, its global options move to just after it.
pub fn normalize(argv: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(argv.len());
    let mut ended = false;
    for (i, arg) in argv.into_iter().enumerate() {
        if i == 0 || ended {
            out.push(arg);
            continue;
        }
        match arg.as_str() {
            "--" => {
                ended = true;
                out.push(arg);
            }
            "-h" => out.push("--help".into()),
            "-" => out.push("--stdin".into()),
            long if long.starts_with("--") && long.contains('=') => {
                let (name, value) = long.split_once('=').unwrap_or((long, ""));
                out.push(name.to_string());
                out.push(value.to_string());
            }
            _ => out.push(arg),
        }
    }
    if out.get(1).map(String::as_str) == Some("keeper") {
        hoist_globals(&mut out);
    }
    out
}

/// Moves the keeper's global options (each with its value) from after its
/// subcommand to just after `keeper`, where argh reads them.
fn hoist_globals(argv: &mut Vec<String>) {
    let words: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut hoisted = Vec::new();
    let mut kept = Vec::new();
    let mut i = 2;
    // Global options already before the subcommand stay where they are.
    while i < words.len() && GLOBAL_OPTIONS.contains(&words[i]) {
        hoisted.extend(
            words[i..(i + 2).min(words.len())]
                .iter()
                .map(|s| s.to_string()),
        );
        i += 2;
    }
    let command: Vec<&str> = words[i.min(words.len())..]
        .iter()
        .take_while(|w| !w.starts_with('-'))
        .copied()
        .collect();
    let mut ended = false;
    while i < words.len() {
        let w = words[i];
        ended |= w == "--";
        let own = OWN_OPTIONS
            .iter()
            .any(|(cmd, opt)| *opt == w && command.starts_with(cmd));
        if !ended && GLOBAL_OPTIONS.contains(&w) && !own && i + 1 < words.len() {
            hoisted.push(w.to_string());
            hoisted.push(words[i + 1].to_string());
            i += 2;
            continue;
        }
        kept.push(w.to_string());
        i += 1;
    }
    argv.truncate(2);
    argv.extend(hoisted);
    argv.extend(kept);
}

/// A parse error, explained for a person: argh's message, "did you mean" for
/// an unknown word close to a flag or command known there, and the command
/// whose `--help` lists them. `help(prefix)` is argh's help for the command
/// `prefix` (the arguments after the program name) reaches.
pub fn explain(error: &str, args: &[&str], help: impl Fn(&[&str]) -> Option<String>) -> String {
    let error = error.trim_end();
    let unknown = error.strip_prefix("Unrecognized argument: ").map(str::trim);
    let (text, reached) = match unknown.and_then(|u| args.iter().position(|a| *a == u)) {
        Some(at) => (help(&args[..at]), &args[..at]),
        None => (help(args), args),
    };
    let Some(text) = text else {
        return error.to_string();
    };
    let command = usage_command(&text).unwrap_or_else(|| reached.join(" "));
    let mut said = match unknown {
        Some(word) => {
            let what = if word.starts_with('-') {
                "option"
            } else {
                "command or argument"
            };
            let known = candidates(&text);
            // A flag for a flag, a command for a word.
            let alike = known
                .iter()
                .map(String::as_str)
                .filter(|c| c.starts_with('-') == word.starts_with('-'));
            match crate::suggest::nearest(word, alike) {
                Some(near) => format!("unknown {what} {word:?}; did you mean {near:?}?"),
                None => format!("unknown {what} {word:?}"),
            }
        }
        None => error.to_string(),
    };
    said.push_str(&format!("\n(`{command} --help` lists what it takes)"));
    said
}

/// `rbee keeper infer` from argh's `Usage: rbee keeper infer [--prompt …] …`.
fn usage_command(help: &str) -> Option<String> {
    let usage = help.lines().find_map(|l| l.strip_prefix("Usage: "))?;
    let words: Vec<&str> = usage
        .split_whitespace()
        .take_while(|w| !w.starts_with(['[', '<', '-']))
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

/// The flags and commands a help text lists (`  -q, --quiet   …`, `  infer   …`).
fn candidates(help: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut section = "";
    for line in help.lines() {
        if !line.starts_with(' ') {
            section = line.trim_end_matches(':');
            continue;
        }
        let Some(head) = line.trim_start().split("  ").next() else {
            continue;
        };
        match section {
            "Options" => found.extend(
                head.split(", ")
                    .filter(|f| f.starts_with('-'))
                    .map(str::to_string),
            ),
            "Commands" if line.starts_with("  ") && !line.starts_with("   ") => {
                found.push(head.trim().to_string())
            }
            _ => {}
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(argv: &[&str]) -> Vec<String> {
        normalize(argv.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn global_options_move_before_the_subcommand_and_dashes_are_read() {
        assert_eq!(
            norm(&[
                "rbee",
                "keeper",
                "workers",
                "list",
                "--queen-url",
                "http://q:1",
                "-h"
            ]),
            [
                "rbee",
                "keeper",
                "--queen-url",
                "http://q:1",
                "workers",
                "list",
                "--help"
            ]
        );
        assert_eq!(
            norm(&[
                "rbee",
                "keeper",
                "infer",
                "hi",
                "--token-file=/t",
                "-",
                "--",
                "-h",
                "--queen-url"
            ]),
            [
                "rbee",
                "keeper",
                "--token-file",
                "/t",
                "infer",
                "hi",
                "--stdin",
                "--",
                "-h",
                "--queen-url"
            ]
        );
        // `hive add --token-file` is the hive's own token.
        assert_eq!(
            norm(&[
                "rbee",
                "keeper",
                "hive",
                "add",
                "mac",
                "--token-file",
                "/h",
                "--queen-url",
                "u"
            ]),
            [
                "rbee",
                "keeper",
                "--queen-url",
                "u",
                "hive",
                "add",
                "mac",
                "--token-file",
                "/h"
            ]
        );
        // Other roles keep their words where they are.
        assert_eq!(
            norm(&["rbee", "worker", "--queen-url", "x"]),
            ["rbee", "worker", "--queen-url", "x"]
        );
    }

    const HELP: &str = "Usage: rbee keeper infer [--prompt <prompt>] [-q] [words...]\n\n\
        Answer a prompt.\n\nOptions:\n  --max-tokens      tokens to generate at most\n  \
        -q, --quiet       nothing on stderr\n                    but a final error\n  \
        --help, help      display usage information\n\nCommands:\n  run   Chat\n  list  The models\n";

    #[test]
    fn an_unknown_word_gets_the_nearest_flag_or_command_and_the_help_to_read() {
        let help = |_: &[&str]| Some(HELP.to_string());
        let said = explain(
            "Unrecognized argument: --max-token\n",
            &["keeper", "infer", "--max-token", "5"],
            help,
        );
        assert_eq!(
            said,
            "unknown option \"--max-token\"; did you mean \"--max-tokens\"?\n\
             (`rbee keeper infer --help` lists what it takes)"
        );
        let said = explain("Unrecognized argument: ls\n", &["keeper", "ls"], help);
        assert!(
            said.starts_with("unknown command or argument \"ls\"; did you mean \"list\"?"),
            "{said}"
        );
        let far = explain("Unrecognized argument: --zzzzzz\n", &["--zzzzzz"], help);
        assert!(far.starts_with("unknown option \"--zzzzzz\"\n"), "{far}");
        let other = explain(
            "Required options not provided:\n    --url\n",
            &["hive", "add"],
            help,
        );
        assert!(
            other.starts_with(
                "Required options not provided:\n    --url\n(`rbee keeper infer --help`"
            ),
            "{other}"
        );
    }

    #[test]
    fn the_help_text_lists_flags_with_their_short_forms_and_commands() {
        assert_eq!(
            candidates(HELP),
            ["--max-tokens", "-q", "--quiet", "--help", "run", "list"]
        );
    }
}
