//! lb-userspace's top-level modules form layers: a module imports only from layers below its
//! own, so there is no import cycle and data flows one way. This test runs the analysis of
//! `/work/shared/tools/import-cycles` (one module per file or folder under src/; `crate::` and
//! `lb_userspace::` paths, `{a, b}` groups included; `#[cfg(test)] mod tests` ignored) and fails
//! on any cycle and on any import that is not strictly downward in [`LAYERS`].
//!
//! A new top-level module must be declared in a layer here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom first. A module may import only modules of strictly lower layers.
const LAYERS: &[&[&str]] = &[
    // The vocabulary and pure tools: import nothing of ours.
    &["model", "maglev", "http", "ipam", "node_state"],
    // The kernel's network state (rtnetlink); the model's memory estimate.
    &["net", "memory"],
    // The BPF maps; where backends are.
    &["dataplane", "resolve"],
    // Model -> maps (and its driver); the subsystems beside it: health checks and load, the BGP
    // speaker (a protocol library), the static config, the backends' decapsulator.
    &["reconcile", "health", "bgp", "config", "decap"],
    // The read side: inspect, explain, trace, metrics over one read layer.
    &["observe"],
    // The Kubernetes source and the agent: composes everything.
    &["k8s"],
];

/// Files and folders that are not a module of the library (the binary's entry point and its
/// subcommands, `cli`, declared from main.rs; the crate root).
const NOT_MODULES: &[&str] = &["main", "cli", "lib", "bin"];

/// One import: from a module to another, and the file that makes it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Import {
    from: String,
    to: String,
    file: String,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The text without its test module: like the tool, everything from `#[cfg(test)] mod tests {`
/// on (test modules come last in this crate's files).
fn without_tests(src: &str) -> &str {
    let mut from = 0;
    while let Some(i) = src[from..].find("#[cfg(test)]") {
        let at = from + i;
        let rest = src[at + "#[cfg(test)]".len()..].trim_start();
        if let Some(rest) = rest.strip_prefix("mod")
            && rest.starts_with(char::is_whitespace)
            && let Some(rest) = rest.trim_start().strip_prefix("tests")
            && rest.trim_start().starts_with('{')
        {
            return &src[..at];
        }
        from = at + 1;
    }
    src
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_lowercase() || c == '_'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
}

/// The leading `[a-z_][a-z0-9_]*` of `s`.
fn leading_ident(s: &str) -> Option<&str> {
    let s = s.trim_start();
    if !s.starts_with(is_ident_start) {
        return None;
    }
    let end = s.find(|c: char| !is_ident(c)).unwrap_or(s.len());
    Some(&s[..end])
}

/// The first path segments named after `crate::` or `lb_userspace::`, groups included
/// (`crate::{a::X, b}` names `a` and `b`).
fn used_modules(src: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for prefix in ["crate::", "lb_userspace::"] {
        let mut from = 0;
        while let Some(i) = src[from..].find(prefix) {
            let at = from + i;
            from = at + prefix.len();
            // A whole word only (not `my_crate::`).
            if src[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
            {
                continue;
            }
            let rest = &src[from..];
            if let Some(name) = leading_ident(rest) {
                used.insert(name.to_owned());
            } else if let Some(group) = rest.strip_prefix('{') {
                // Split the group at its top-level commas; each part's first segment.
                let (mut depth, mut part) = (1usize, String::new());
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    if depth == 0 || (depth == 1 && c == ',') {
                        if let Some(name) = leading_ident(&part) {
                            used.insert(name.to_owned());
                        }
                        part.clear();
                        if depth == 0 {
                            break;
                        }
                    } else {
                        part.push(c);
                    }
                }
            }
        }
    }
    used
}

/// Every module (file or folder under `src`) and the imports among them.
fn imports(src: &Path) -> (BTreeSet<String>, Vec<Import>) {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut modules = BTreeSet::new();
    let mut uses = Vec::new();
    for path in &files {
        let rel = path.strip_prefix(src).expect("under src");
        let first = rel
            .components()
            .next()
            .expect("a path")
            .as_os_str()
            .to_string_lossy()
            .into_owned();
        let module = first.strip_suffix(".rs").unwrap_or(&first).to_owned();
        if NOT_MODULES.contains(&module.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        for used in used_modules(without_tests(&text)) {
            if used != module {
                uses.push(Import {
                    from: module.clone(),
                    to: used,
                    file: rel.display().to_string(),
                });
            }
        }
        modules.insert(module);
    }
    // Only imports of our own modules (not `crate::foo!` macros, not re-exported items).
    uses.retain(|i| modules.contains(&i.to));
    uses.sort();
    uses.dedup();
    (modules, uses)
}

/// A cycle among `modules`, if any, as the modules along it (the first repeated at the end).
fn find_cycle(graph: &BTreeMap<&str, BTreeSet<&str>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit<'a>(
        m: &'a str,
        graph: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        marks: &mut BTreeMap<&'a str, Mark>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        marks.insert(m, Mark::Open);
        path.push(m);
        for &next in graph.get(m).into_iter().flatten() {
            match marks.get(next).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let start = path.iter().position(|p| *p == next).unwrap_or(0);
                    let mut cycle: Vec<String> =
                        path[start..].iter().map(|s| (*s).to_owned()).collect();
                    cycle.push(next.to_owned());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(next, graph, marks, path) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks.insert(m, Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for &m in graph.keys() {
        if marks.get(m).copied().unwrap_or(Mark::New) == Mark::New
            && let Some(c) = visit(m, graph, &mut marks, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn no_import_cycle_and_every_import_goes_down_the_layers() {
    let (modules, imports) = imports(&src_dir());
    assert!(modules.len() > 5, "found only {modules:?} under src/");
    let layer_of: BTreeMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, layer)| layer.iter().map(move |m| (*m, i)))
        .collect();
    let mut problems = Vec::new();
    for m in &modules {
        if !layer_of.contains_key(m.as_str()) {
            problems.push(format!(
                "module `{m}` is in no layer: declare it in LAYERS (tests/layers.rs)"
            ));
        }
    }
    for m in layer_of.keys() {
        if !modules.contains(*m) {
            problems.push(format!(
                "LAYERS names `{m}`, which is not a module under src/"
            ));
        }
    }
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for i in &imports {
        graph.entry(&i.from).or_default().insert(&i.to);
        if let (Some(from), Some(to)) = (layer_of.get(i.from.as_str()), layer_of.get(i.to.as_str()))
            && to >= from
        {
            problems.push(format!(
                "{}: `{}` (layer {from}) imports `{}` (layer {to}): a module imports only from \
                 lower layers",
                i.file, i.from, i.to
            ));
        }
    }
    if let Some(cycle) = find_cycle(&graph) {
        problems.push(format!("import cycle: {}", cycle.join(" -> ")));
    }
    let edges: Vec<String> = graph
        .iter()
        .map(|(m, to)| {
            format!(
                "{m} -> {}",
                to.iter().copied().collect::<Vec<_>>().join(",")
            )
        })
        .collect();
    assert!(
        problems.is_empty(),
        "{}\n\nimports now:\n{}",
        problems.join("\n"),
        edges.join("\n")
    );
}

#[test]
fn the_parser_sees_paths_groups_and_skips_tests() {
    let src = "use crate::{a::X, b, c::{d, e}};\nuse lb_userspace::f;\nfn g() { crate::h::i(); \
               my_crate::j(); }\n#[cfg(test)]\nmod tests {\n use crate::k;\n}\n";
    let used = used_modules(without_tests(src));
    let used: Vec<&str> = used.iter().map(String::as_str).collect();
    assert_eq!(used, ["a", "b", "c", "f", "h"]);
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    graph.entry("x").or_default().insert("y");
    graph.entry("y").or_default().insert("z");
    assert_eq!(find_cycle(&graph), None);
    graph.entry("z").or_default().insert("x");
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["x".into(), "y".into(), "z".into(), "x".into()])
    );
}

/// Only `dataplane` names aya: everything else reads and writes the maps through its methods,
/// in lb-common's types, so that the map layout has one owner.
#[test]
fn only_the_dataplane_names_aya() {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let dataplane = src.join("dataplane");
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| !f.starts_with(&dataplane))
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            without_tests(&text)
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .any(|l| l.contains("aya::") || l.contains("use aya"))
        })
        .map(|f| f.strip_prefix(&src).unwrap_or(f).display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "these files name aya outside dataplane/: {offenders:?}"
    );
}
