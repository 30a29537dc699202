//! Tables for people: a header row, columns aligned with two spaces, sizes in
//! human units; `--json` gives scripts the queen's own objects instead.

use std::io::Write;

/// Rows under a header, written aligned.
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&'static str]) -> Table {
        Table {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table, or `empty` (say, "no workers") when it has no rows.
    pub fn write(&self, out: &mut impl Write, empty: &str) -> std::io::Result<()> {
        if self.rows.is_empty() {
            return writeln!(out, "{empty}");
        }
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        let lines: Vec<&Vec<String>> = std::iter::once(&header).chain(&self.rows).collect();
        let widths: Vec<usize> = (0..self.header.len())
            .map(|c| {
                lines
                    .iter()
                    .map(|l| l.get(c).map_or(0, |s| s.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for line in lines {
            let mut text = String::new();
            for (c, width) in widths.iter().enumerate() {
                let cell = line.get(c).map_or("", String::as_str);
                if c + 1 == widths.len() {
                    text.push_str(cell);
                } else {
                    let pad = width - cell.chars().count();
                    text.push_str(cell);
                    text.push_str(&" ".repeat(pad + 2));
                }
            }
            writeln!(out, "{}", text.trim_end())?;
        }
        Ok(())
    }

    /// Writes the table to stdout.
    pub fn print(&self, empty: &str) -> Result<(), String> {
        self.write(&mut std::io::stdout().lock(), empty)
            .map_err(|e| format!("cannot write: {e}"))
    }
}

/// `value` as pretty JSON on stdout, for `--json`.
pub fn print_json(value: &impl serde::Serialize) -> Result<(), String> {
    use std::io::Write;
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    writeln!(std::io::stdout().lock(), "{text}").map_err(|e| format!("cannot write: {e}"))
}

/// MiB in human units: `967 MB`, `8.0 GB`.
pub fn mb(n: u64) -> String {
    if n >= 1024 {
        format!("{:.1} GB", n as f64 / 1024.0)
    } else {
        format!("{n} MB")
    }
}

/// A worker's resident set, `-` until its hive has measured it.
pub fn resident(w: &crate::protocol::WorkerInfo) -> String {
    match w.resident_mb {
        0 => "-".to_string(),
        r => mb(r),
    }
}

/// Bytes in human units.
pub fn bytes(n: u64) -> String {
    mb(n.div_ceil(1 << 20))
}

/// The hive a worker runs on, or a split worker's hives with their layers:
/// `desk 16 + mac 14`.
pub fn worker_hives(hive: &str, w: &crate::protocol::WorkerInfo) -> String {
    if w.split.is_empty() {
        return hive.to_string();
    }
    w.split
        .iter()
        .map(|p| {
            let name = if p.hive.is_empty() { hive } else { &p.hive };
            format!("{name} {}", p.layers)
        })
        .collect::<Vec<_>>()
        .join(" + ")
}

/// What a hive lends to split workers on others, or `None`.
pub fn lends(leases: &[crate::protocol::LeaseInfo]) -> Option<String> {
    (!leases.is_empty()).then(|| {
        leases
            .iter()
            .map(|l| format!("{} layers of {} to {}", l.layers, l.model, l.borrower))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_under_a_header_and_empty_says_so() {
        let mut t = Table::new(&["NAME", "SIZE", "WHERE"]);
        t.row(vec!["smollm2-135m".into(), mb(93), "localhost".into()]);
        t.row(vec!["llama-70b".into(), mb(40960), "desktop".into()]);
        let mut out = Vec::new();
        t.write(&mut out, "no models").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "NAME          SIZE     WHERE\n\
             smollm2-135m  93 MB    localhost\n\
             llama-70b     40.0 GB  desktop\n"
        );
        let mut out = Vec::new();
        Table::new(&["ID"]).write(&mut out, "no workers").unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "no workers\n");
        assert_eq!(bytes(98 << 20), "98 MB");
    }
}
