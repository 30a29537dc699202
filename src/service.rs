//! Roles that come back after a reboot: `rbee hive --install-service` (or
//! `queen`) writes a per-user service that runs this executable with the
//! flags given — a systemd user unit on Linux, a launchd agent on macOS —
//! and starts it where the service manager runs; `--uninstall-service`
//! stops and removes it. The files are made by pure functions, tested by
//! their content.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What the service runs: this executable, a role, its flags, from a directory
/// (so relative paths among the flags mean what they meant here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub exe: PathBuf,
    pub role: &'static str,
    pub args: Vec<String>,
    pub workdir: PathBuf,
    /// `RBEE_HOME`, when set: the service sees the same data directory.
    pub rbee_home: Option<String>,
}

/// The two switches, and their flags taken out of `argv` (role first).
pub const INSTALL: &str = "--install-service";
pub const UNINSTALL: &str = "--uninstall-service";

impl Service {
    /// The service for `role` started with `argv` (the role's own flags), as
    /// this process was started.
    pub fn from_here(role: &'static str, argv: &[String]) -> Result<Service, String> {
        if std::env::var_os("RBEE_TOKEN").is_some() && !argv.iter().any(|a| a == "--token-file") {
            return Err(
                "the token comes from RBEE_TOKEN, which a service does not inherit: \
                 pass it with --token-file instead"
                    .into(),
            );
        }
        let exe = std::env::current_exe()
            .and_then(std::fs::canonicalize)
            .map_err(|e| format!("cannot tell where this executable is: {e}"))?;
        let workdir = std::env::current_dir().map_err(|e| format!("no working directory: {e}"))?;
        if workdir.display().to_string().contains(['\n', '\r']) {
            return Err(format!(
                "a service cannot start in {:?}: its name holds a line break; run this from \
                 another directory",
                workdir.display().to_string()
            ));
        }
        Ok(Service {
            exe,
            role,
            args: argv
                .iter()
                .filter(|a| *a != INSTALL && *a != UNINSTALL)
                .cloned()
                .collect(),
            workdir,
            rbee_home: std::env::var("RBEE_HOME").ok(),
        })
    }

    /// The systemd user unit.
    pub fn systemd_unit(&self) -> String {
        let mut exec = vec![quote_systemd(&self.exe.display().to_string(), true)];
        exec.push(self.role.to_string());
        exec.extend(self.args.iter().map(|a| quote_systemd(a, true)));
        // Environment= expands specifiers but not variables: `$` stays as it is.
        let env = self.rbee_home.as_ref().map_or(String::new(), |h| {
            format!(
                "Environment={}\n",
                quote_systemd(&format!("RBEE_HOME={h}"), false)
            )
        });
        format!(
            "[Unit]\n\
             Description=rbee {role} (LLM inference cluster)\n\
             After=network-online.target\n\
             Wants=network-online.target\n\
             \n\
             [Service]\n\
             ExecStart={exec}\n\
             WorkingDirectory={dir}\n\
             {env}\
             Restart=on-failure\n\
             RestartSec=2\n\
             \n\
             [Install]\n\
             WantedBy=default.target\n",
            role = self.role,
            exec = exec.join(" "),
            // A path, not words: never quoted (systemd would take the quotes
            // as part of it), only its specifiers kept literal.
            dir = self.workdir.display().to_string().replace('%', "%%"),
        )
    }

    /// The launchd agent's property list.
    pub fn launchd_plist(&self, log: &Path) -> String {
        let mut program = vec![self.exe.display().to_string(), self.role.to_string()];
        program.extend(self.args.iter().cloned());
        let strings: String = program
            .iter()
            .map(|a| format!("    <string>{}</string>\n", xml_escape(a)))
            .collect();
        let env = self.rbee_home.as_ref().map_or(String::new(), |h| {
            format!(
                "  <key>EnvironmentVariables</key>\n  <dict>\n    <key>RBEE_HOME</key>\n    \
                 <string>{}</string>\n  </dict>\n",
                xml_escape(h)
            )
        });
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \
             \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
             <plist version=\"1.0\">\n<dict>\n\
             \x20 <key>Label</key>\n  <string>{label}</string>\n\
             \x20 <key>ProgramArguments</key>\n  <array>\n{strings}  </array>\n\
             \x20 <key>WorkingDirectory</key>\n  <string>{dir}</string>\n\
             {env}\
             \x20 <key>RunAtLoad</key>\n  <true/>\n\
             \x20 <key>KeepAlive</key>\n  <dict>\n    <key>SuccessfulExit</key>\n    <false/>\n  </dict>\n\
             \x20 <key>StandardErrorPath</key>\n  <string>{log}</string>\n\
             </dict>\n</plist>\n",
            label = launchd_label(self.role),
            dir = xml_escape(&self.workdir.display().to_string()),
            log = xml_escape(&log.display().to_string()),
        )
    }
}

fn launchd_label(role: &str) -> String {
    format!("dev.rbee.{role}")
}

/// One word of `ExecStart` (or `Environment`): quoted when it must be, with
/// C escapes for quotes, backslashes and control characters (a line break
/// is `\n`), systemd's specifiers (`%`) and, where it expands them
/// (`dollar`: `ExecStart`), its variables (`$`) kept literal.
fn quote_systemd(word: &str, dollar: bool) -> String {
    let mut literal = word.replace('%', "%%");
    if dollar {
        literal = literal.replace('$', "$$");
    }
    if !literal.is_empty()
        && !literal
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\' | ';'))
    {
        return literal;
    }
    let mut quoted = String::from("\"");
    for c in literal.chars() {
        match c {
            '\\' => quoted.push_str("\\\\"),
            '"' => quoted.push_str("\\\""),
            '\n' => quoted.push_str("\\n"),
            '\t' => quoted.push_str("\\t"),
            '\r' => quoted.push_str("\\r"),
            c if c.is_control() => quoted.push_str(&format!("\\x{:02x}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn home() -> Result<PathBuf, String> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .ok_or_else(|| "HOME is not set: cannot tell where services live".to_string())
}

/// Where this OS keeps a user's service for `role`.
fn service_file(role: &str) -> Result<PathBuf, String> {
    if cfg!(target_os = "macos") {
        return Ok(home()?
            .join("Library/LaunchAgents")
            .join(format!("{}.plist", launchd_label(role))));
    }
    let config = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(c) if !c.is_empty() => PathBuf::from(c),
        _ => home()?.join(".config"),
    };
    Ok(config
        .join("systemd/user")
        .join(format!("rbee-{role}.service")))
}

/// Runs a service manager command; its complaint when it fails.
fn manage(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    Err(format!("{program} {}: {}", args.join(" "), err.trim()))
}

/// Writes the service and starts it; what happened, in words, for the user.
pub fn install(service: &Service) -> Result<String, String> {
    let file = service_file(service.role)?;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let role = service.role;
    let text = if cfg!(target_os = "macos") {
        let log = home()?
            .join("Library/Logs")
            .join(format!("rbee-{role}.log"));
        service.launchd_plist(&log)
    } else {
        service.systemd_unit()
    };
    std::fs::write(&file, text).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    let path = file.display().to_string();
    let (started, by_hand) = if cfg!(target_os = "macos") {
        (
            manage("launchctl", &["load", "-w", &path]),
            format!("launchctl load -w {path}"),
        )
    } else {
        let unit = format!("rbee-{role}.service");
        (
            manage("systemctl", &["--user", "daemon-reload"])
                .and_then(|()| manage("systemctl", &["--user", "enable", "--now", &unit])),
            format!("systemctl --user enable --now {unit}"),
        )
    };
    Ok(match started {
        Ok(()) if cfg!(target_os = "macos") => format!("wrote {path}; loaded with launchctl"),
        Ok(()) => format!(
            "wrote {path}; started and enabled (systemctl --user status rbee-{role}). It \
             starts when you log in; to start it at boot without a login: \
             loginctl enable-linger $USER"
        ),
        Err(e) => format!(
            "wrote {path}; not started, as the service manager said: {e}. Start it where \
             it runs with: {by_hand}"
        ),
    })
}

/// Stops the service and removes its file.
pub fn uninstall(role: &str) -> Result<String, String> {
    let file = service_file(role)?;
    if !file.exists() {
        return Ok(format!(
            "no rbee {role} service installed ({} is absent)",
            file.display()
        ));
    }
    // Best effort: the manager may not run here; the file goes either way.
    let _ = if cfg!(target_os = "macos") {
        manage("launchctl", &["unload", "-w", &file.display().to_string()])
    } else {
        manage(
            "systemctl",
            &[
                "--user",
                "disable",
                "--now",
                &format!("rbee-{role}.service"),
            ],
        )
    };
    std::fs::remove_file(&file).map_err(|e| format!("cannot remove {}: {e}", file.display()))?;
    if !cfg!(target_os = "macos") {
        let _ = manage("systemctl", &["--user", "daemon-reload"]);
    }
    Ok(format!("removed {}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(args: &[&str]) -> Service {
        Service {
            exe: PathBuf::from("/opt/rbee/bin/rbee"),
            role: "hive",
            args: args.iter().map(|a| a.to_string()).collect(),
            workdir: PathBuf::from("/home/me"),
            rbee_home: None,
        }
    }

    #[test]
    fn the_unit_runs_this_executable_in_its_role_with_the_flags_given() {
        let unit = service(&["--host", "0.0.0.0", "--token-file", "tok"]).systemd_unit();
        assert!(
            unit.contains("ExecStart=/opt/rbee/bin/rbee hive --host 0.0.0.0 --token-file tok\n"),
            "{unit}"
        );
        assert!(unit.contains("WorkingDirectory=/home/me\n"), "{unit}");
        assert!(unit.contains("Restart=on-failure\n"), "{unit}");
        assert!(unit.contains("WantedBy=default.target\n"), "{unit}");
        assert!(!unit.contains("Environment="), "{unit}");
    }

    #[test]
    fn unit_words_with_spaces_quotes_percent_and_dollar_stay_literal() {
        let mut s = service(&[
            "--data-dir",
            "/srv/my models",
            "--allowed-hosts",
            "a%b$c\"d",
        ]);
        s.rbee_home = Some("/data/rbee home".into());
        let unit = s.systemd_unit();
        assert!(
            unit.contains(r#"--data-dir "/srv/my models" --allowed-hosts "a%%b$$c\"d""#),
            "{unit}"
        );
        assert!(
            unit.contains("Environment=\"RBEE_HOME=/data/rbee home\"\n"),
            "{unit}"
        );
    }

    /// systemd itself reads the unit: a directory with a space and a `$`,
    /// words with quotes, a line break, `$` and `%`, a home with `$`.
    #[test]
    fn systemd_analyze_verifies_a_unit_made_of_awkward_words() {
        let Ok(probe) = std::process::Command::new("systemd-analyze")
            .arg("--version")
            .output()
        else {
            eprintln!("no systemd-analyze here: skipped");
            return;
        };
        assert!(probe.status.success());
        let dir = std::env::temp_dir().join(format!("rbee unit $HOME %h {}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = service(&[
            "--data-dir",
            "/srv/my models",
            "--allowed-hosts",
            "a%b$c\"d\ne'f",
        ]);
        s.exe = std::env::current_exe().unwrap();
        s.workdir = dir.clone();
        s.rbee_home = Some("/data/rbee $home".into());
        let unit = s.systemd_unit();
        assert!(
            unit.contains(&format!(
                "WorkingDirectory={}\n",
                dir.display().to_string().replace('%', "%%")
            )),
            "{unit}"
        );
        assert!(
            unit.contains("Environment=\"RBEE_HOME=/data/rbee $home\""),
            "{unit}"
        );
        let file = dir.join("rbee-hive.service");
        std::fs::write(&file, &unit).unwrap();
        let verified = std::process::Command::new("systemd-analyze")
            .args(["verify", file.to_str().unwrap()])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&verified.stderr).to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(verified.status.success(), "{unit}\n{said}");
    }

    #[test]
    fn the_launchd_agent_lists_every_word_and_keeps_the_role_alive() {
        let plist = service(&["--port", "8080", "--allowed-origins", "a&b"])
            .launchd_plist(Path::new("/Users/me/Library/Logs/rbee-hive.log"));
        assert!(plist.contains("<string>dev.rbee.hive</string>"), "{plist}");
        for word in ["/opt/rbee/bin/rbee", "hive", "--port", "8080", "a&amp;b"] {
            assert!(
                plist.contains(&format!("<string>{word}</string>")),
                "{word}: {plist}"
            );
        }
        assert!(plist.contains("<key>RunAtLoad</key>\n  <true/>"), "{plist}");
        assert!(plist.contains("<key>SuccessfulExit</key>"), "{plist}");
    }
}
