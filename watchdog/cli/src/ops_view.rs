//! How the operator's commands show what they read: the status tables, the rules table, a
//! rollback record as one line, and JSON for `--json`.

use std::borrow::Cow;

use detour_registry::gray::{Mesh, Rule, RuleSet};
use serde::Serialize;

use crate::ops::{RollbackRecord, StatusReport};

impl StatusReport {
    /// The two tables, as text.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let hosts: Vec<Vec<String>> = self
            .hosts
            .iter()
            .map(|h| {
                vec![
                    h.host.clone(),
                    h.state.clone(),
                    h.version.clone(),
                    h.uptime_s.map_or("-".into(), |s| format!("{s}s")),
                    h.restarts.map_or("-".into(), |r| r.to_string()),
                    if h.links.is_empty() {
                        "-".into()
                    } else {
                        h.links.join(",")
                    },
                    if h.binary.is_empty() {
                        "-".into()
                    } else {
                        h.binary.clone()
                    },
                ]
            })
            .collect();
        out.push_str(&render(
            &[
                "HOST", "STATE", "VERSION", "UPTIME", "RESTARTS", "LINKS", "BINARY",
            ],
            &hosts,
        ));
        out.push('\n');
        let services: Vec<Vec<String>> = self
            .services
            .iter()
            .map(|s| {
                vec![
                    s.service.clone(),
                    format!("{}/{}", s.healthy, s.instances),
                    s.mesh.clone(),
                    s.protected
                        .map_or("-".into(), |p| if p { "yes".into() } else { "no".into() }),
                    if s.rules.is_empty() {
                        "-".into()
                    } else {
                        s.rules.join(",")
                    },
                ]
            })
            .collect();
        out.push_str(&render(
            &["SERVICE", "HEALTHY/INSTANCES", "MESH", "PROTECTED", "RULES"],
            &services,
        ));
        for h in self.hosts.iter().filter(|h| !h.refused.is_empty()) {
            out.push_str(&format!("\n{}: {}\n", h.host, h.refused));
        }
        if !self.malformed_rules.is_empty() {
            out.push_str(&format!(
                "\n{} malformed rule(s) left out: {}\n",
                self.malformed_rules.len(),
                self.malformed_rules.join("; ")
            ));
        }
        out
    }
}

/// `s` as one cell or field of a terminal's output: every control character written as its
/// escape (`\u{1b}`), newlines and tabs included. Registry values are any host's or operator's
/// writing: raw, an escape sequence would reach the operator's terminal (moving the cursor,
/// rewriting what the table showed, retitling the window) and a newline would forge a row.
pub fn printable(s: &str) -> Cow<'_, str> {
    escaped(s, |_| true)
}

/// A whole output for a terminal: control characters escaped as in [`printable`], except the
/// newlines and tabs that lay it out.
pub fn terminal_safe(s: &str) -> Cow<'_, str> {
    escaped(s, |c| c != '\n' && c != '\t')
}

fn escaped(s: &str, escape: impl Fn(char) -> bool) -> Cow<'_, str> {
    let bad = |c: char| c.is_control() && escape(c);
    if !s.chars().any(bad) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if bad(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A plain text table; every cell [`printable`].
pub fn render(head: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<Cow<'_, str>>> = rows
        .iter()
        .map(|r| r.iter().map(|c| printable(c)).collect())
        .collect();
    let mut width: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = width.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = width[i].saturating_sub(c.chars().count());
            l.push_str(c);
            if i + 1 < cells.len() {
                l.push_str(&" ".repeat(pad + 2));
            }
        }
        l.push('\n');
        l
    };
    let mut out = line(head.to_vec());
    for r in &rows {
        out.push_str(&line(r.iter().map(|c| c.as_ref()).collect()));
    }
    out
}

pub use detour_proto::utc::utc;

/// A rollback record as one line.
pub fn record_line(r: &RollbackRecord) -> String {
    let scope = match (&r.service, &r.host) {
        (None, None) => "everything".to_owned(),
        (Some(s), None) => format!("service {s}"),
        (None, Some(h)) => format!("host {h}"),
        (Some(s), Some(h)) => format!("service {s} on host {h}"),
    };
    let undone = r.undone.as_ref().map_or(String::new(), |u| {
        format!(" (undone by {} at {})", u.user, utc(u.at_unix_ms))
    });
    let line = format!(
        "{} {} {} by {} at {}: {}{undone}",
        r.id,
        r.kind,
        scope,
        r.user,
        utc(r.at_unix_ms),
        if r.reason.is_empty() { "-" } else { &r.reason }
    );
    printable(&line).into_owned()
}

/// Every rule of `set`, as a table.
pub fn rules_table(set: &RuleSet) -> String {
    let rows: Vec<Vec<String>> = set
        .rules
        .iter()
        .map(|r| {
            let action = match (&r.mesh, &r.sidecar) {
                (Some(Mesh::On), _) => "mesh on".to_owned(),
                (Some(Mesh::Off), _) => "mesh off".to_owned(),
                (None, Some(v)) if v.baseline => "sidecar baseline".to_owned(),
                (None, Some(v)) => format!(
                    "sidecar {}{}",
                    v.binary,
                    if v.version.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", v.version)
                    }
                ),
                (None, None) => "-".into(),
            };
            let hosts = match (&r.hosts, r.percent) {
                (Some(h), _) => h.clone(),
                (None, Some(p)) => format!("{p}%"),
                (None, None) => "*".into(),
            };
            vec![
                r.id.clone(),
                action,
                r.service.clone().unwrap_or_else(|| "*".into()),
                hosts,
                format!("{:?}", r.origin).to_lowercase(),
            ]
        })
        .collect();
    render(&["ID", "ACTION", "SERVICE", "HOSTS", "ORIGIN"], &rows)
}

/// Serializes for `--json`.
pub fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// The rules as `--json` shows them.
#[derive(Debug, Serialize)]
pub struct RulesJson<'a> {
    /// Well-formed rules.
    pub rules: &'a [Rule],
    /// Left out.
    pub malformed: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_245_109_327), "2026-12-02T20:58:29Z");
    }

    #[test]
    fn registry_text_reaches_the_terminal_escaped() {
        // A version string that would clear the screen and forge a row.
        let evil = "1.0\u{1b}[2J\nh9  ready";
        let t = render(&["HOST", "VERSION"], &[vec!["h1".into(), evil.into()]]);
        assert!(!t.contains('\u{1b}'), "{t:?}");
        assert_eq!(t.lines().count(), 2, "{t:?}");
        assert!(t.contains("1.0\\u{1b}[2J\\u{a}h9  ready"), "{t:?}");
        assert_eq!(printable("plain"), Cow::Borrowed("plain"));
        let out = terminal_safe("a\tb\n\u{7}\u{9b}c\n");
        assert_eq!(out, "a\tb\n\\u{7}\\u{9b}c\n");
    }

    #[test]
    fn tables_line_up() {
        let t = render(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\n");
    }
}
