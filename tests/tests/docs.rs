//! The docs and the code cannot drift apart. docs/configuration.md's generated sections (every
//! flag with its default, the ConfigMap's keys with their flags and defaults, the IPAddressPool's
//! fields) are what the code and the manifests say now; every `sluice.io/` name and config-file
//! key the code knows is documented, and every one the docs name exists; every YAML example in
//! the README and docs/ parses (a sluice config through sluice's own parser, Kubernetes objects
//! against the CRD); every `sluice ...` command example (synopses expanded) parses with sluice's
//! own command line (its hidden parse-only mode, SLUICE_PARSE_ONLY); every kustomize overlay
//! renders with the image tagged with the version; the docs' relative links resolve.
//!
//! `SLUICE_UPDATE_DOCS=1 cargo test -p sluice-tests --test docs` rewrites the generated sections.
//! Needs the built `sluice` (`cargo build -p lb-userspace --bin sluice`) and kubectl
//! (scripts/kube-apiserver.sh, cached); no root, no namespaces.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use marked_yaml::Node;
use sluice_tests::kube::{binaries, overlays, repo_root};
use sluice_tests::lab::sluice_binary;

const REFERENCE: &str = "docs/configuration.md";
const UPDATE_VAR: &str = "SLUICE_UPDATE_DOCS";
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The `sluice` commands whose `--help` the reference holds.
const COMMANDS: &[&[&str]] = &[
    &[],
    &["run"],
    &["attach"],
    &["agent"],
    &["detach"],
    &["decap"],
    &["inspect"],
    &["inspect", "backends"],
    &["inspect", "flows"],
    &["inspect", "stats"],
    &["explain"],
    &["trace"],
];

fn read(rel: &str) -> Result<String> {
    fs::read_to_string(repo_root().join(rel)).with_context(|| format!("reading {rel}"))
}

/// README.md and every page of docs/ (not the benchmark's generated report).
fn pages() -> Result<Vec<(String, String)>> {
    let mut names = vec!["README.md".to_owned()];
    for entry in fs::read_dir(repo_root().join("docs"))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            names.push(format!("docs/{name}"));
        }
    }
    names.sort();
    names
        .into_iter()
        .map(|n| Ok((read(&n)?, n)).map(|(text, n)| (n, text)))
        .collect()
}

// ----- YAML -----

/// Every document of a (multi-document) YAML text.
fn documents(text: &str, origin: &str) -> Result<Vec<Node>> {
    let mut docs = Vec::new();
    for doc in text.split("\n---") {
        if doc
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            continue;
        }
        docs.push(marked_yaml::parse_yaml(0, doc).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?);
    }
    Ok(docs)
}

fn at<'a>(node: &'a Node, path: &[&str]) -> Option<&'a Node> {
    path.iter()
        .try_fold(node, |n, key| match key.parse::<usize>() {
            Ok(i) => n.as_sequence()?.get(i),
            Err(_) => n.as_mapping()?.get_node(key),
        })
}

fn text_at<'a>(node: &'a Node, path: &[&str]) -> Option<&'a str> {
    at(node, path)?.as_scalar().map(|s| s.as_str())
}

fn keys(node: &Node) -> Vec<String> {
    node.as_mapping()
        .map(|m| m.keys().map(|k| k.as_str().to_owned()).collect())
        .unwrap_or_default()
}

fn kind(doc: &Node) -> &str {
    text_at(doc, &["kind"]).unwrap_or("")
}

/// The IPAddressPool CRD's schema of `spec`.
fn pool_spec_schema() -> Result<Node> {
    let crd = documents(&read("deploy/base/05-crd-ipaddresspools.yaml")?, "the CRD")?;
    let crd = crd.first().context("the CRD file is empty")?;
    at(
        crd,
        &[
            "spec",
            "versions",
            "0",
            "schema",
            "openAPIV3Schema",
            "properties",
            "spec",
        ],
    )
    .cloned()
    .context("the CRD has no spec schema")
}

// ----- the generated sections -----

/// `sluice COMMAND --help` for every command, as the reference prints it.
fn flags_section() -> Result<String> {
    let bin = sluice_binary()?;
    let mut out = String::new();
    for args in COMMANDS {
        // No SLUICE_* variable of this shell may show up as a value in the help.
        let run = Command::new(&bin)
            .args(*args)
            .arg("--help")
            .env_clear()
            .output()
            .with_context(|| format!("running {} --help", bin.display()))?;
        ensure!(
            run.status.success(),
            "sluice {} --help failed",
            args.join(" ")
        );
        let help: Vec<&str> = std::str::from_utf8(&run.stdout)?
            .lines()
            .map(str::trim_end)
            .collect();
        let name = ["sluice"]
            .iter()
            .chain(args.iter())
            .copied()
            .collect::<Vec<_>>();
        out += &format!(
            "### `{}`\n```text\n{}\n```\n",
            name.join(" "),
            help.join("\n").trim_end()
        );
    }
    Ok(out)
}

/// The ConfigMap's keys, each with its default and the flag the DaemonSet passes it as.
fn configmap_section() -> Result<String> {
    let cm = documents(&read("deploy/base/20-configmap.yaml")?, "the ConfigMap")?;
    let ds = documents(&read("deploy/base/30-daemonset.yaml")?, "the DaemonSet")?;
    let (cm, ds) = (
        cm.first().context("empty ConfigMap file")?,
        ds.first().context("empty DaemonSet file")?,
    );
    let data = at(cm, &["data"]).context("the ConfigMap has no data")?;
    let container = at(ds, &["spec", "template", "spec", "containers", "0"])
        .context("the DaemonSet has no container")?;
    let env = at(container, &["env"])
        .and_then(Node::as_sequence)
        .context("the DaemonSet's container has no env")?;
    let args: Vec<&str> = at(container, &["args"])
        .and_then(Node::as_sequence)
        .context("the DaemonSet's container has no args")?
        .iter()
        .filter_map(|a| a.as_scalar().map(|s| s.as_str()))
        .collect();
    let mut used = BTreeSet::new();
    let mut rows = String::from("| key | default | flag of `sluice agent` |\n|---|---|---|\n");
    for key in keys(data) {
        let default = text_at(data, &[&key]).unwrap_or("");
        let var = env
            .iter()
            .find(|e| text_at(e, &["valueFrom", "configMapKeyRef", "key"]) == Some(&key))
            .and_then(|e| text_at(e, &["name"]))
            .with_context(|| {
                format!("ConfigMap key {key} is read by no env var of the DaemonSet")
            })?;
        let flag = args
            .iter()
            .find_map(|a| a.strip_suffix(&format!("=$({var})")))
            .with_context(|| format!("env var {var} (key {key}) is passed to no flag"))?;
        used.insert(key.clone());
        rows += &format!("| `{key}` | `{default:?}` | `{flag}` |\n");
    }
    for e in env.iter() {
        if let Some(key) = text_at(e, &["valueFrom", "configMapKeyRef", "key"]) {
            ensure!(
                used.contains(key),
                "the DaemonSet reads ConfigMap key {key}, which it lacks"
            );
        }
    }
    Ok(rows)
}

/// The IPAddressPool's `spec` fields: type, default, description.
fn pool_section() -> Result<String> {
    fn walk(schema: &Node, prefix: &str, rows: &mut String) {
        let Some(props) = at(schema, &["properties"]) else {
            return;
        };
        for field in keys(props) {
            let Some(s) = at(props, &[&field]) else {
                continue;
            };
            let path = format!("{prefix}.{field}");
            let ty = text_at(s, &["type"]).unwrap_or("object");
            let ty = match text_at(s, &["items", "type"]) {
                Some(item) if ty == "array" => format!("array of {item}"),
                _ => ty.to_owned(),
            };
            let default = text_at(s, &["default"]).unwrap_or("");
            let about = text_at(s, &["description"]).unwrap_or("");
            let about = about.split_whitespace().collect::<Vec<_>>().join(" ");
            rows.push_str(&format!(
                "| `{path}` | {ty} | {} | {} |\n",
                if default.is_empty() {
                    String::new()
                } else {
                    format!("`{default}`")
                },
                about.replace('|', "\\|")
            ));
            walk(s, &path, rows);
        }
    }
    let mut rows = String::from("| field | type | default | meaning |\n|---|---|---|---|\n");
    walk(&pool_spec_schema()?, "spec", &mut rows);
    Ok(rows)
}

fn generated(name: &str) -> Result<String> {
    match name {
        "flags" => flags_section(),
        "configmap" => configmap_section(),
        "ipaddresspool" => pool_section(),
        other => bail!("{REFERENCE} has a generated section {other:?} this test does not know"),
    }
}

/// The reference with every generated section as the code has it now.
fn regenerate(text: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("<!-- BEGIN GENERATED: ") {
        let head_end = start + rest[start..].find("-->").context("unclosed BEGIN marker")? + 3;
        let name = rest[start + 22..head_end - 3].trim();
        let end_marker = format!("<!-- END GENERATED: {name} -->");
        let end = rest
            .find(&end_marker)
            .with_context(|| format!("no {end_marker}"))?;
        out += &rest[..head_end];
        out += "\n";
        out += &generated(name)?;
        out += &end_marker;
        rest = &rest[end + end_marker.len()..];
    }
    out += rest;
    Ok(out)
}

#[test]
fn the_generated_reference_is_what_the_code_says() -> Result<()> {
    let now = read(REFERENCE)?;
    let want = regenerate(&now)?;
    if now == want {
        return Ok(());
    }
    if std::env::var_os(UPDATE_VAR).is_some() {
        fs::write(repo_root().join(REFERENCE), &want)?;
        eprintln!("rewrote {REFERENCE}");
        return Ok(());
    }
    let first = now
        .lines()
        .zip(want.lines())
        .position(|(a, b)| a != b)
        .unwrap_or_else(|| now.lines().count().min(want.lines().count()));
    bail!(
        "{REFERENCE} disagrees with the code from line {}:\n  docs: {:?}\n  code: {:?}\n\
         Rewrite its generated sections with `{UPDATE_VAR}=1 cargo test -p sluice-tests --test docs`",
        first + 1,
        now.lines().nth(first).unwrap_or("<end>"),
        want.lines().nth(first).unwrap_or("<end>"),
    )
}

// ----- names and keys -----

/// Every `sluice.io/...` string the library uses outside its unit tests.
fn sluice_io_names_in_code() -> Result<BTreeSet<String>> {
    fn visit(dir: &Path, names: &mut BTreeSet<String>) -> Result<()> {
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                visit(&path, names)?;
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = fs::read_to_string(&path)?;
                let code = text.split("#[cfg(test)]").next().unwrap_or("");
                names.extend(sluice_io_names(code, "\"sluice.io/"));
            }
        }
        Ok(())
    }
    let mut names = BTreeSet::new();
    visit(&repo_root().join("lb-userspace/src"), &mut names)?;
    Ok(names)
}

fn sluice_io_names(text: &str, prefix: &str) -> BTreeSet<String> {
    text.match_indices(prefix)
        .map(|(i, _)| {
            let rest = &text[i + prefix.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
                .unwrap_or(rest.len());
            format!("sluice.io/{}", rest[..end].trim_end_matches('.'))
        })
        .collect()
}

#[test]
fn every_sluice_io_name_is_documented_and_every_documented_one_exists() -> Result<()> {
    let code = sluice_io_names_in_code()?;
    ensure!(code.len() >= 5, "found only {code:?} in lb-userspace/src");
    let reference = read(REFERENCE)?;
    let missing: Vec<_> = code
        .iter()
        .filter(|n| !reference.contains(&format!("`{n}`")))
        .collect();
    ensure!(
        missing.is_empty(),
        "{REFERENCE} does not name {missing:?} (used by the code)"
    );
    for (page, text) in pages()? {
        for name in sluice_io_names(&text, "sluice.io/") {
            // The API group's version is the CRD's, not a name in the code.
            ensure!(
                code.contains(&name) || name == "sluice.io/v1alpha1",
                "{page} names {name}, which the code does not know"
            );
        }
    }
    Ok(())
}

/// A `const NAME: &[&str] = &[...]` table of config/schema.rs.
fn schema_keys(table: &str) -> Result<Vec<String>> {
    let schema = read("lb-userspace/src/config/schema.rs")?;
    let start = schema
        .find(&format!("const {table}: &[&str] = &["))
        .with_context(|| format!("config/schema.rs has no {table}"))?;
    let body = &schema[start + format!("const {table}: &[&str] = &[").len()..];
    let body = &body[..body.find(']').context("table end")?];
    Ok(body
        .split(',')
        .map(|k| k.trim().trim_matches('"').to_owned())
        .filter(|k| !k.is_empty())
        .collect())
}

#[test]
fn every_config_file_key_is_in_the_reference_and_the_example() -> Result<()> {
    let reference = read(REFERENCE)?;
    // Only the config file's section: a key must be in its table, not merely in some help text.
    let section = reference
        .split("\n## ")
        .find(|s| s.starts_with("The config file"))
        .with_context(|| format!("{REFERENCE} has no section \"The config file ...\""))?;
    let example = read("docs/standalone.md")?;
    for table in ["TOP_KEYS", "VIP_KEYS", "BACKEND_KEYS", "HEALTH_CHECK_KEYS"] {
        let keys = schema_keys(table)?;
        ensure!(!keys.is_empty(), "{table} read as empty");
        for key in keys {
            ensure!(
                section.contains(&format!("`{key}`")),
                "{REFERENCE} lacks config key {key} ({table})"
            );
            ensure!(
                example.contains(&format!("{key}:")),
                "docs/standalone.md's example lacks {key} ({table})"
            );
        }
    }
    Ok(())
}

// ----- examples -----

/// The ```yaml blocks of a page.
fn yaml_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```yaml") => current = Some(String::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

/// A Kubernetes object of the docs or overlays: an IPAddressPool's spec holds only fields of the
/// CRD; every object names its kind and apiVersion.
fn check_object(doc: &Node, origin: &str, pool_schema: &Node) -> Result<()> {
    ensure!(
        text_at(doc, &["apiVersion"]).is_some() && !kind(doc).is_empty(),
        "{origin}: an object without apiVersion or kind"
    );
    if kind(doc) == "IPAddressPool" {
        let known = at(pool_schema, &["properties"])
            .map(keys)
            .unwrap_or_default();
        let spec = at(doc, &["spec"]).context("an IPAddressPool without spec")?;
        for field in keys(spec) {
            ensure!(
                known.contains(&field),
                "{origin}: IPAddressPool has no field spec.{field}"
            );
        }
    }
    Ok(())
}

#[test]
fn every_yaml_example_parses() -> Result<()> {
    let pool_schema = pool_spec_schema()?;
    let mut configs = 0;
    let mut objects = 0;
    for (page, text) in pages()? {
        for (i, block) in yaml_blocks(&text).iter().enumerate() {
            let origin = format!("{page}, YAML example {}", i + 1);
            if block.contains("apiVersion:") {
                for doc in documents(block, &origin)? {
                    check_object(&doc, &origin, &pool_schema)?;
                    objects += 1;
                }
            } else {
                lb_userspace::config::parse(block, &origin).map_err(|e| anyhow::anyhow!("{e}"))?;
                configs += 1;
            }
        }
    }
    ensure!(
        configs >= 1 && objects >= 1,
        "found {configs} configs and {objects} objects"
    );
    Ok(())
}

// ----- command examples -----

/// Values for the placeholders the docs' synopses use (`--iface IF`, `--allow PREFIX`, ...): an
/// example is parsed once with each. A placeholder missing here fails the test, naming it.
const PLACEHOLDERS: &[(&str, &str)] = &[
    ("ADDR", "192.0.2.1"),
    ("ASN", "64512"),
    ("CLIENT", "192.0.2.7"),
    ("CLIENT_IP", "192.0.2.7"),
    ("F", "/run/sluice/load"),
    ("FILE", "/etc/sluice/kubeconfig"),
    ("IF", "eth0"),
    ("N", "3"),
    ("NAME", "node-1"),
    ("NS", "sluice-system"),
    ("PORT", "40312"),
    ("PREFIX", "10.0.0.0/24"),
    ("PRIME", "65537"),
    ("PROTO", "tcp"),
    ("VIP", "10.0.0.10"),
];

/// A `sluice ...` command line of the docs: where it is and its text (after `sluice`).
struct CommandExample {
    origin: String,
    args: String,
}

/// The `sluice` command lines of a page: every line of a ```sh block that runs `sluice` (also
/// through `kubectl exec ... -- /sluice`), every `$ sluice` line of an unlabelled block, and
/// every inline code span that runs it through `kubectl exec`. `\` continuations are joined,
/// `# comments` dropped; spans with `...` (elided arguments) are prose, not examples.
fn command_examples(page: &str, text: &str) -> Vec<CommandExample> {
    // The arguments after the `sluice` a line runs, if it runs it.
    fn after_sluice(line: &str) -> Option<&str> {
        let line = line
            .trim_start()
            .trim_start_matches("$ ")
            .trim_start_matches("sudo ");
        if let Some(rest) = line.strip_prefix("sluice ") {
            return Some(rest);
        }
        ["-- /sluice ", "-- sluice "]
            .iter()
            .find_map(|m| line.find(m).map(|i| &line[i + m.len()..]))
    }
    let mut found = Vec::new();
    let mut block: Option<&str> = None;
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(lang) = trimmed.strip_prefix("```") {
            block = if block.is_some() { None } else { Some(lang) };
            continue;
        }
        let code = line.split(" #").next().unwrap_or("").trim_end();
        if let Some((start, mut joined)) = pending.take() {
            joined.push(' ');
            joined.push_str(code.trim_start().trim_end_matches('\\'));
            if code.ends_with('\\') {
                pending = Some((start, joined));
            } else {
                found.push(CommandExample {
                    origin: format!("{page}:{start}"),
                    args: joined,
                });
            }
            continue;
        }
        let runs = match block {
            Some("sh") => after_sluice(code),
            Some("") if trimmed.starts_with("$ sluice ") => after_sluice(code),
            Some(_) => None,
            None => {
                for span in line.split('`').skip(1).step_by(2) {
                    if span.contains("exec")
                        && !span.contains("...")
                        && let Some(args) = after_sluice(span)
                    {
                        found.push(CommandExample {
                            origin: format!("{page}:{}", i + 1),
                            args: args.to_owned(),
                        });
                    }
                }
                None
            }
        };
        if let Some(args) = runs {
            let args = args.trim_end_matches('\\').to_owned();
            if code.ends_with('\\') {
                pending = Some((i + 1, args));
            } else {
                found.push(CommandExample {
                    origin: format!("{page}:{}", i + 1),
                    args,
                });
            }
        }
    }
    found
}

/// A synopsis word: alternatives (`auto|PRIME`), or an optional group (`[--iface eth0]`).
enum Synopsis {
    Word(Vec<String>),
    Optional(Vec<Synopsis>),
}

/// `a [b c|d [e]] f...` as a tree; `...` (more of the same) is dropped.
fn synopsis(text: &str) -> Result<Vec<Synopsis>> {
    let spaced = text.replace('[', " [ ").replace(']', " ] ");
    let mut stack: Vec<Vec<Synopsis>> = vec![Vec::new()];
    for token in spaced.split_whitespace() {
        match token {
            "[" => stack.push(Vec::new()),
            "]" => {
                let group = stack.pop().context("a `]` without `[`")?;
                stack
                    .last_mut()
                    .context("a `]` without `[`")?
                    .push(Synopsis::Optional(group));
            }
            "..." => {}
            word => {
                let word = word.trim_end_matches("...").trim_end_matches(',');
                let alternatives = word.split('|').map(substitute).collect::<Result<_>>()?;
                stack
                    .last_mut()
                    .context("unbalanced brackets")?
                    .push(Synopsis::Word(alternatives));
            }
        }
    }
    ensure!(stack.len() == 1, "a `[` without `]`");
    Ok(stack.pop().unwrap_or_default())
}

/// A word with its placeholders (upper-case names) replaced by [`PLACEHOLDERS`]' values.
fn substitute(word: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = word;
    while let Some(start) = rest.find(|c: char| c.is_ascii_uppercase()) {
        let (before, from) = rest.split_at(start);
        out.push_str(before);
        let end = from
            .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(from.len());
        let name = &from[..end];
        let value = PLACEHOLDERS
            .iter()
            .find(|(p, _)| *p == name)
            .map(|(_, v)| *v)
            .with_context(|| format!("placeholder {name} has no value in PLACEHOLDERS"))?;
        out.push_str(value);
        rest = &from[end..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The concrete command lines a synopsis stands for, enough to try every word: the k-th
/// alternative of each word (the last one when it has fewer), with every optional group left
/// out, and with every one put in.
fn expansions(tree: &[Synopsis]) -> Vec<Vec<String>> {
    fn widest(tree: &[Synopsis]) -> usize {
        tree.iter()
            .map(|s| match s {
                Synopsis::Word(alternatives) => alternatives.len(),
                Synopsis::Optional(group) => widest(group),
            })
            .max()
            .unwrap_or(1)
    }
    fn expand(tree: &[Synopsis], k: usize, optional: bool, args: &mut Vec<String>) {
        for s in tree {
            match s {
                Synopsis::Word(alternatives) => {
                    let chosen = alternatives.get(k).or(alternatives.last());
                    args.extend(chosen.filter(|a| !a.is_empty()).cloned());
                }
                Synopsis::Optional(group) if optional => expand(group, k, optional, args),
                Synopsis::Optional(_) => {}
            }
        }
    }
    let mut all = Vec::new();
    for k in 0..widest(tree) {
        for optional in [false, true] {
            let mut args = Vec::new();
            expand(tree, k, optional, &mut args);
            if !all.contains(&args) {
                all.push(args);
            }
        }
    }
    all
}

#[test]
fn every_sluice_command_example_parses() -> Result<()> {
    let sluice = sluice_binary()?;
    let mut checked = 0;
    let mut failures = Vec::new();
    for (page, text) in pages()? {
        for example in command_examples(&page, &text) {
            let tree = synopsis(&example.args)
                .with_context(|| format!("{}: `sluice {}`", example.origin, example.args))?;
            for args in expansions(&tree) {
                // The binary's parse-only mode: clap's own checks (subcommands, flags, values
                // through their parsers), then exit; nothing is attached or read.
                let out = Command::new(&sluice)
                    .args(&args)
                    .env("SLUICE_PARSE_ONLY", "1")
                    .env_remove("SLUICE_PIN_DIR")
                    .output()?;
                checked += 1;
                if !out.status.success() {
                    failures.push(format!(
                        "{}: `sluice {}` does not parse: {}",
                        example.origin,
                        args.join(" "),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
            }
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n\n"));
    // The docs hold a few dozen; far fewer means the scan above stopped finding them.
    ensure!(checked >= 20, "only {checked} sluice command lines found");
    println!("{checked} sluice command lines parse");
    Ok(())
}

// ----- the install surface -----

/// `kubectl kustomize` of every kubectl at hand: the 1.20 build the tests run (kustomize 2.0.3)
/// and a newer one on PATH if any (kustomize 5: the dialect must suit both).
fn kubectls() -> Result<Vec<PathBuf>> {
    let mut all = vec![binaries()?.join("kubectl")];
    all.extend(
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join("kubectl"))
            .find(|p| p.is_file()),
    );
    Ok(all)
}

#[test]
fn every_overlay_renders_with_the_versioned_image() -> Result<()> {
    let pool_schema = pool_spec_schema()?;
    let names = overlays()?;
    ensure!(names.len() >= 3, "deploy/overlays holds only {names:?}");
    for kubectl in kubectls()? {
        for name in &names {
            let dir = repo_root().join("deploy/overlays").join(name);
            let out = Command::new(&kubectl).arg("kustomize").arg(&dir).output()?;
            let origin = format!("{} kustomize deploy/overlays/{name}", kubectl.display());
            ensure!(
                out.status.success(),
                "{origin}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let docs = documents(&String::from_utf8(out.stdout)?, &origin)?;
            for doc in &docs {
                check_object(doc, &origin, &pool_schema)?;
            }
            let find = |k: &str| docs.iter().find(|d| kind(d) == k);
            let ds = find("DaemonSet").with_context(|| format!("{origin}: no DaemonSet"))?;
            let container = ["spec", "template", "spec", "containers", "0"];
            let image = text_at(ds, &[&container[..], &["image"]].concat()).unwrap_or("");
            ensure!(
                image == format!("localhost/sluice:{VERSION}"),
                "{origin}: the DaemonSet runs {image:?}, not the version {VERSION}"
            );
            for k in [
                "Namespace",
                "CustomResourceDefinition",
                "ServiceAccount",
                "ConfigMap",
            ] {
                ensure!(find(k).is_some(), "{origin}: no {k}");
            }
            let args: Vec<&str> = at(ds, &[&container[..], &["args"]].concat())
                .and_then(Node::as_sequence)
                .map(|s| {
                    s.iter()
                        .filter_map(|a| a.as_scalar().map(|s| s.as_str()))
                        .collect()
                })
                .unwrap_or_default();
            let cm = find("ConfigMap").context("no ConfigMap")?;
            let pool = find("IPAddressPool").is_some();
            let (announce, bgp) = (
                args.contains(&"--announce"),
                text_at(cm, &["data", "bgp"]) == Some("true"),
            );
            // What each shape is for (deploy/overlays/*/kustomization.yaml).
            let want = match name.as_str() {
                "beside-metallb" => (false, false, false),
                "l2-announce" => (true, false, true),
                "bgp" => (false, true, true),
                other => bail!("overlay {other}: this test does not know what it should render"),
            };
            ensure!(
                (announce, bgp, pool) == want,
                "{origin}: (--announce, bgp, a pool) = {:?}, want {want:?}",
                (announce, bgp, pool)
            );
        }
    }
    Ok(())
}

#[test]
fn the_version_is_written_once_and_the_docs_name_it() -> Result<()> {
    let base = documents(&read("deploy/base/kustomization.yaml")?, "the base")?;
    let tag = base
        .first()
        .and_then(|b| text_at(b, &["images", "0", "newTag"]))
        .context("deploy/base/kustomization.yaml has no images[0].newTag")?;
    ensure!(
        tag == VERSION,
        "deploy/base's image tag {tag} is not the version {VERSION} (Cargo.toml)"
    );
    let ds = read("deploy/base/30-daemonset.yaml")?;
    ensure!(
        ds.contains("image: localhost/sluice\n"),
        "deploy/base/30-daemonset.yaml names a tag: it belongs in kustomization.yaml alone"
    );
    for (page, text) in pages()? {
        for (i, _) in text
            .match_indices("sluice-")
            .chain(text.match_indices("sluice:"))
        {
            let rest = &text[i + 7..];
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let version = rest[..end].trim_end_matches('.');
            if version.split('.').count() == 3 {
                ensure!(
                    version == VERSION,
                    "{page} names sluice {version}, not {VERSION}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn relative_links_resolve() -> Result<()> {
    for (page, text) in pages()? {
        let dir = repo_root()
            .join(&page)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let target = &rest[..rest.find(')').unwrap_or(0)];
            let file = target.split('#').next().unwrap_or("");
            if file.is_empty() || file.contains("://") {
                continue;
            }
            ensure!(
                dir.join(file).exists(),
                "{page} links to {target}, which does not exist"
            );
        }
    }
    Ok(())
}
