//! The sidecar's rooms import only what docs/architecture.md ("The sidecar's rooms") allows:
//! every `crate::…` path in a room's code (tests aside) is checked against its list.

use std::path::{Path, PathBuf};

/// Each room and what it may import besides itself (a prefix allows everything under it).
const RULES: &[(&str, &[&str])] = &[
    ("config", &["tls::identity"]),
    ("tls", &["config", "ratelimit"]),
    (
        "http",
        &["config", "tls", "process::lifecycle", "telemetry"],
    ),
    (
        "inbound",
        &[
            "config",
            "http",
            "policy",
            "ratelimit",
            "process::lifecycle",
            "telemetry",
            "access_log",
        ],
    ),
    (
        "outbound",
        &[
            "config",
            "http",
            "tls",
            "policy",
            "process::lifecycle",
            "telemetry",
            "access_log",
        ],
    ),
    (
        "admin",
        &[
            "config",
            "tls",
            "http",
            "inbound",
            "outbound",
            "process",
            "policy",
            "ratelimit",
            "telemetry",
        ],
    ),
    ("process", &["config", "tls", "http", "app"]),
];

/// The `.rs` files under `dir`, tests (`tests.rs`, `*_tests.rs`, `tests/`) aside.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("a room's directory") {
        let path = entry.expect("a directory entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if path.is_dir() && name != "tests" {
            out.extend(sources(&path));
        } else if name.ends_with(".rs") && name != "tests.rs" && !name.ends_with("_tests.rs") {
            out.push(path);
        }
    }
    out
}

/// Every `crate::a::b` path in the code of `text` (comments aside), as `a::b` (or `a`).
fn crate_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let path: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
            out.push(
                segments
                    .iter()
                    .take(2)
                    .copied()
                    .collect::<Vec<_>>()
                    .join("::"),
            );
        }
    }
    out
}

/// Whether a room may name `path`: its own, one of its list, or the crate root's `VERSION`.
fn allowed(room: &str, allow: &[&str], path: &str) -> bool {
    let under = |prefix: &str| path == prefix || path.starts_with(&format!("{prefix}::"));
    path == "VERSION" || under(room) || allow.iter().any(|a| under(a))
}

#[test]
fn each_room_imports_only_what_it_may() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut broken = Vec::new();
    for (room, allow) in RULES {
        let files = sources(&src.join(room));
        assert!(!files.is_empty(), "room {room} has no sources");
        for file in files {
            let text = std::fs::read_to_string(&file).expect("a source file");
            for path in crate_paths(&text) {
                if !allowed(room, allow, &path) {
                    broken.push(format!("{}: crate::{path}", file.display()));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "imports a room may not make:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_checker_sees_a_forbidden_import() {
    let paths = crate_paths("use crate::outbound::links::Links; // crate::admin in a comment");
    assert_eq!(paths, ["outbound::links"]);
    assert!(!allowed("config", &["tls::identity"], &paths[0]));
    assert!(allowed("config", &["tls::identity"], "tls::identity"));
    assert!(!allowed("config", &["tls::identity"], "tls::guard"));
}
