//! The architecture's rules, checked on the source itself: the core crate depends on no I/O
//! crate (the compiler then enforces its purity), and the daemon's top-level modules form
//! layers without an import cycle.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Crates that do I/O (or an async runtime): none may be in `qs-core`'s dependency tree.
const IO_CRATES: &[&str] = &[
    "tokio",
    "mio",
    "reqwest",
    "hyper",
    "clickhouse",
    "tungstenite",
    "tokio-tungstenite",
    "axum",
    "notify",
    "socket2",
];

#[test]
fn the_core_crate_depends_on_no_io_crate() {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "--locked",
            "-p",
            "qs-core",
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    let names: BTreeSet<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(names.contains("qs-core"), "{tree}");
    let bad: Vec<&&str> = IO_CRATES.iter().filter(|c| names.contains(**c)).collect();
    assert!(bad.is_empty(), "qs-core depends on {bad:?}:\n{tree}");
}

/// The `.rs` files of a top-level module: `src/<name>.rs` and everything under `src/<name>/`.
fn files_of(src: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let file = src.join(format!("{name}.rs"));
    if file.is_file() {
        out.push(file);
    }
    let mut dirs = vec![src.join(name)];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out
}

/// Top-level modules each module uses (`crate::<name>`), test code excluded.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let modules: Vec<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';').to_string())
        .collect();
    assert!(modules.len() > 5, "{modules:?}");
    let mut graph = BTreeMap::new();
    for m in &modules {
        let mut uses = BTreeSet::new();
        for f in files_of(&src, m) {
            let text = std::fs::read_to_string(&f).unwrap();
            // Unit tests may reach anywhere; only the module's own code counts.
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            let grouped = grouped_imports(code);
            for other in &modules {
                if other != m
                    && (code.contains(&format!("crate::{other}::"))
                        || code.contains(&format!("crate::{other};"))
                        || code.contains(&format!("crate::{other}}}"))
                        || grouped.contains(other))
                {
                    uses.insert(other.clone());
                }
            }
        }
        graph.insert(m.clone(), uses);
    }
    graph
}

/// The first path segments inside `crate::{…}` groups (`use crate::{store::Store, tasks};`
/// names `store` and `tasks`), nested braces and line breaks included.
fn grouped_imports(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::{") {
        rest = &rest[i + "crate::{".len()..];
        let (mut depth, mut item, mut end) = (0usize, String::new(), rest.len());
        for (j, c) in rest.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    end = j;
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.extend(first_segment(&item));
                    item.clear();
                    continue;
                }
                _ => {}
            }
            if depth == 0 {
                item.push(c);
            }
        }
        out.extend(first_segment(&item));
        rest = &rest[end..];
    }
    out
}

fn first_segment(item: &str) -> Option<String> {
    let seg: String = item
        .trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!seg.is_empty()).then_some(seg)
}

#[test]
fn grouped_imports_are_read() {
    let code =
        "use crate::{operator::X, store::{Store, state::Row},\n    tasks};\nuse crate::config::Y;";
    assert_eq!(
        grouped_imports(code),
        BTreeSet::from([
            "operator".to_string(),
            "store".to_string(),
            "tasks".to_string()
        ])
    );
}

/// A cycle in `graph`, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for next in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let g = |edges: &[(&str, &str)]| {
        let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            m.entry(a.to_string()).or_default().insert(b.to_string());
            m.entry(b.to_string()).or_default();
        }
        m
    };
    assert_eq!(find_cycle(&g(&[("a", "b"), ("b", "c")])), None);
    assert_eq!(
        find_cycle(&g(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}

#[test]
fn top_level_modules_have_no_import_cycle() {
    let graph = module_graph();
    assert_eq!(find_cycle(&graph), None, "module graph: {graph:#?}");
    // The layers the architecture names: tasks never reach up into the operator, the store
    // and the exchange transport know nothing of each other or of what runs them.
    for (low, high) in [
        ("tasks", "operator"),
        ("tasks", "app"),
        ("store", "exchange"),
        ("exchange", "store"),
        ("store", "operator"),
        ("exchange", "operator"),
        ("exchange", "tasks"),
    ] {
        assert!(
            !graph[low].contains(high),
            "{low} must not use {high}: {graph:#?}"
        );
    }
}
