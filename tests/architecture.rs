//! The module graph, pinned: every `crate::<module>` a top-level module of `src/` names must be an edge
//! listed here, and the edges must form no cycle. A new edge is a design decision: add it below with the
//! reason, or find the leaf (`vocab`, `certs`, `context`) the shared piece belongs in. ARCHITECTURE.md
//! describes the rooms these edges connect.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// `from -> to` edges that may exist. The intended shape: `vocab`, `certs`, `secret` and `watch` are leaves;
/// `config` is data and reaches no stage; `protocol` and `router` do no I/O; `session` never reaches
/// router, store or relay; `store` and `relay` never reach session or router; nothing reaches
/// `admin`, `listener` or `runtime` but the process setup (`runtime`).
const ALLOWED: &[(&str, &str)] = &[
    // The admin server reads the process through its own `Control` trait, never `runtime`.
    ("admin", "cluster"),
    ("admin", "config"),
    ("admin", "context"),
    ("admin", "proxy"),
    ("admin", "router"),
    ("admin", "store"),
    // Authentication: the store-login decision reads the session's credentials and speaks the store
    // side's login forms; auth_http reaches only secrets.
    ("auth", "certs"),
    ("auth", "config"),
    ("auth", "metrics"),
    ("auth", "protocol"),
    ("auth", "secret"),
    ("auth", "session"),
    ("auth", "store"),
    // The shared state across replicas: a stage with I/O that reads its settings and the leaves, and
    // exports its own series.
    ("cluster", "certs"),
    ("cluster", "config"),
    ("cluster", "metrics"),
    ("cluster", "secret"),
    ("cluster", "vocab"),
    // Config is data: it validates with the leaves, never with a stage.
    ("config", "certs"),
    ("config", "secret"),
    ("config", "vocab"),
    // The fleet handle is process state, like the store registry.
    ("context", "cluster"),
    ("context", "metrics"),
    // The store registry is process state: pools and health outlive a snapshot.
    ("context", "store"),
    ("context", "throttle"),
    ("context", "vocab"),
    ("demo", "config"),
    ("demo", "protocol"),
    ("listener", "context"),
    ("listener", "metrics"),
    ("listener", "proxy"),
    ("metrics", "certs"),
    ("metrics", "vocab"),
    ("placement", "certs"),
    ("placement", "config"),
    ("placement", "metrics"),
    ("placement", "secret"),
    ("placement", "vocab"),
    // The map file and the config are watched the same way (`watch`, a leaf).
    ("placement", "watch"),
    ("protocol", "secret"),
    // The composition: the one module that sees every stage.
    ("proxy", "auth"),
    ("proxy", "certs"),
    ("proxy", "cluster"),
    ("proxy", "config"),
    ("proxy", "context"),
    ("proxy", "metrics"),
    ("proxy", "placement"),
    ("proxy", "proxy_protocol"),
    ("proxy", "relay"),
    ("proxy", "router"),
    ("proxy", "secret"),
    ("proxy", "session"),
    ("proxy", "stream"),
    ("proxy", "throttle"),
    ("proxy", "tls"),
    ("proxy", "vocab"),
    ("proxy", "store"),
    ("relay", "metrics"),
    ("relay", "stream"),
    ("router", "config"),
    ("router", "vocab"),
    // The process setup: starts listeners and the admin server, swaps snapshots.
    ("runtime", "admin"),
    ("runtime", "cluster"),
    ("runtime", "config"),
    ("runtime", "context"),
    ("runtime", "listener"),
    ("runtime", "metrics"),
    ("runtime", "proxy"),
    ("runtime", "throttle"),
    ("runtime", "watch"),
    // The secrets and token files key mailboxes as logins are keyed: a leaf reading a leaf.
    ("secret", "vocab"),
    ("session", "protocol"),
    ("session", "secret"),
    ("session", "stream"),
    ("session", "tls"),
    ("session", "vocab"),
    ("throttle", "config"),
    ("tls", "certs"),
    ("tls", "config"),
    ("tls", "vocab"),
    ("store", "config"),
    ("store", "metrics"),
    ("store", "protocol"),
    ("store", "proxy_protocol"),
    ("store", "secret"),
    ("store", "stream"),
    ("store", "vocab"),
];

/// Modules that must not touch sockets or files.
const NO_IO: &[&str] = &[
    "protocol",
    "router",
    "vocab",
    "session/state.rs",
    "auth/decision.rs",
    "auth/http/wire.rs",
];

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules of the library (a file or a folder under src/), and the text of each.
fn modules() -> BTreeMap<String, Vec<(String, String)>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for file in files {
        let rel = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let top = rel.split('/').next().unwrap().trim_end_matches(".rs");
        if matches!(top, "lib" | "main") {
            continue; // the crate root and the binary wire everything together
        }
        let text = std::fs::read_to_string(&file).unwrap();
        out.entry(top.to_string()).or_default().push((rel, text));
    }
    out
}

/// `crate::name` references in `text` (also inside `use crate::{a, b::c}` groups), comments skipped.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    refs.insert(name);
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                refs.insert(name);
            }
        }
    }
    refs
}

#[test]
fn module_edges_are_the_allowed_ones() {
    let modules = modules();
    let allowed: BTreeSet<(&str, &str)> = ALLOWED.iter().copied().collect();
    let mut found = BTreeSet::new();
    let mut unexpected = Vec::new();
    for (module, files) in &modules {
        for (file, text) in files {
            for target in crate_refs(text) {
                // Only modules count; root items (`crate::start`, `crate::StartError`) are the wiring's.
                if target == *module || !modules.contains_key(&target) {
                    continue;
                }
                found.insert((module.clone(), target.clone()));
                if !allowed.contains(&(module.as_str(), target.as_str())) {
                    unexpected.push(format!("{module} -> {target} (in src/{file})"));
                }
            }
        }
    }
    assert!(
        unexpected.is_empty(),
        "module edges not in the allowlist:\n  {}",
        unexpected.join("\n  ")
    );
    // The allowlist names only edges that exist, so it stays a true picture of the code.
    let stale: Vec<_> = allowed
        .iter()
        .filter(|(a, b)| !found.contains(&(a.to_string(), b.to_string())))
        .collect();
    assert!(stale.is_empty(), "allowed edges no code uses: {stale:?}");
}

#[test]
fn the_module_graph_has_no_cycle() {
    let mut edges: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (a, b) in ALLOWED {
        edges.entry(a).or_default().push(b);
    }
    // Depth-first search with a path stack; a back edge is a cycle.
    fn visit<'a>(
        node: &'a str,
        edges: &BTreeMap<&'a str, Vec<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if done.contains(node) {
            return;
        }
        assert!(
            !path.contains(&node),
            "cycle: {} -> {node}",
            path.join(" -> ")
        );
        path.push(node);
        for next in edges.get(node).into_iter().flatten() {
            visit(next, edges, path, done);
        }
        path.pop();
        done.insert(node);
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        visit(node, &edges, &mut Vec::new(), &mut done);
    }
}

#[test]
fn pure_modules_do_no_io() {
    let modules = modules();
    for (module, files) in &modules {
        for (file, text) in files {
            let pure = NO_IO
                .iter()
                .any(|p| p == module || file.as_str() == *p || file.starts_with(&format!("{p}/")));
            if !pure {
                continue;
            }
            for forbidden in ["tokio::net", "std::net::TcpStream", "std::fs", "tokio::fs"] {
                assert!(
                    !text.contains(forbidden),
                    "src/{file} is meant to do no I/O but uses {forbidden}"
                );
            }
        }
    }
}

#[test]
fn the_leaves_import_nothing_of_popgate() {
    let modules = modules();
    // `vocab` imports nothing; `secret` only `vocab` (its files are keyed as logins are).
    for (leaf, may) in [("vocab", &[][..]), ("secret", &["vocab"][..])] {
        for (file, text) in &modules[leaf] {
            let refs = crate_refs(text);
            assert!(
                refs.iter().all(|r| may.contains(&r.as_str())),
                "src/{file} imports {refs:?}"
            );
        }
    }
}
