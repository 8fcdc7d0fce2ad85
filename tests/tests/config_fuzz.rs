//! Robustness of the config parser: the documented example (lb-userspace/src/config/mod.rs),
//! mutated line by line and token by token, plus plain noise, through `config::parse`. It must
//! never panic, and every error must be one line that starts with `file:line: `.
//! Reproducible: SLUICE_FUZZ_SEED=<seed> SLUICE_FUZZ_CONFIGS=<n>.

use std::panic::{AssertUnwindSafe, catch_unwind};

use lb_userspace::config::parse;
use sluice_tests::fuzz::Rng;

const DEFAULT_CONFIGS: u64 = 20_000;
const ORIGIN: &str = "fuzz.yaml";

/// The example of the config module's documentation, as a file.
fn documented_example() -> String {
    let source = include_str!("../../lb-userspace/src/config/mod.rs");
    let doc: Vec<&str> = source
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect();
    let start = doc
        .iter()
        .position(|l| *l == "```yaml")
        .expect("a yaml example")
        + 1;
    let len = doc[start..]
        .iter()
        .position(|l| *l == "```")
        .expect("its end");
    doc[start..start + len].join("\n") + "\n"
}

/// Values and keys that YAML or the parser might take badly.
const TOKENS: &[&str] = &[
    "",
    "~",
    "null",
    "-1",
    "0",
    "1",
    "7",
    "65535",
    "65536",
    "4294967296",
    "99999999999999999999999",
    "1e5",
    "0x50",
    "0o17",
    "1_000",
    ".inf",
    "NaN",
    "yes",
    "no",
    "true",
    "[]",
    "{}",
    "[1, 2]",
    "{a: b}",
    "\"quoted\"",
    "'single'",
    "'unterminated",
    "\"bad \\q\"",
    "&anchor x",
    "*anchor",
    "!!binary aGk=",
    "!tag x",
    "::",
    "- ",
    "- - -",
    "? key",
    "|",
    ">",
    "10.200.0.10",
    "10.200.0.10/33",
    "10.200.0.0/24",
    "0.0.0.0",
    "255.255.255.255",
    "224.0.0.1",
    "fe80::1",
    "fd00::1",
    "::ffff:10.0.0.1",
    "[fd00::1]",
    "02:00:00:00:01",
    "ff:ff:ff:ff:ff:ff",
    "02-00-00-00-01-02",
    "tcp",
    "UDP",
    "sctp",
    "l2",
    "ipip",
    "client_ip",
    "none",
    "é",
    "\u{0}",
    "\t",
    "#",
    "%YAML 1.2",
    "---",
    "...",
    "vips",
    "backends",
    "address",
    "port",
];

fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for _ in 0..1 + rng.below(4) {
        if lines.is_empty() {
            lines.push(String::new());
        }
        let i = rng.below(lines.len());
        match rng.below(10) {
            0 => {
                lines.remove(i);
            }
            1 => {
                let copy = lines[i].clone();
                lines.insert(rng.below(lines.len() + 1), copy);
            }
            2 => {
                let j = rng.below(lines.len());
                lines.swap(i, j);
            }
            // Indentation: deeper, shallower, or a tab.
            3 => {
                let line = &mut lines[i];
                match rng.below(3) {
                    0 => line.insert_str(0, &" ".repeat(1 + rng.below(4))),
                    1 => *line = line.trim_start().to_owned(),
                    _ => line.insert(0, '\t'),
                }
            }
            // A value replaced.
            4 | 5 => {
                let token = rng.pick(TOKENS);
                let line = &mut lines[i];
                *line = match line.split_once(": ") {
                    Some((key, _)) => format!("{key}: {token}"),
                    None => format!("{line} {token}"),
                };
            }
            // A key replaced.
            6 => {
                let token = rng.pick(TOKENS);
                let line = &mut lines[i];
                if let Some((key, value)) = line.split_once(':') {
                    let indent = key.len() - key.trim_start().len();
                    *line = format!("{}{token}:{value}", &key[..indent]);
                }
            }
            // Noise inside a line.
            7 => {
                let line = &mut lines[i];
                let at = (0..=line.len())
                    .filter(|&k| line.is_char_boundary(k))
                    .nth(rng.below(line.len() + 1))
                    .unwrap_or(0);
                let noise: String = (0..1 + rng.below(6))
                    .map(|_| char::from(rng.pick(b" :-[]{}#&*!|>'\"%@`,?\\\x01\x7f")))
                    .collect();
                line.insert_str(at, &noise);
            }
            // A whole VIP or backend block repeated (duplicate keys, more entries).
            8 => {
                let block: Vec<String> =
                    lines[i..].iter().take(1 + rng.below(8)).cloned().collect();
                let at = rng.below(lines.len() + 1);
                lines.splice(at..at, block);
            }
            _ => {
                lines.truncate(i);
            }
        }
    }
    let mut out = lines.join("\n");
    if rng.chance(80) {
        out.push('\n');
    }
    out
}

fn noise(rng: &mut Rng) -> String {
    let n = rng.below(300);
    (0..n)
        .map(|_| match rng.below(4) {
            0 => char::from(rng.pick(b"\n  :-")),
            1 => char::from(b' ' + (rng.byte() % 95)),
            _ => rng.pick(TOKENS).chars().next().unwrap_or(' '),
        })
        .collect()
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|e| panic!("{name}={value:?}: {e}")),
    )
}

#[test]
fn mutated_configs_give_one_line_errors_never_panics() {
    let example = documented_example();
    parse(&example, ORIGIN).expect("the documented example is valid");
    let seed = env_u64("SLUICE_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let count = env_u64("SLUICE_FUZZ_CONFIGS").unwrap_or(DEFAULT_CONFIGS);
    println!("config fuzz: seed {seed} (SLUICE_FUZZ_SEED), {count} configs");
    let mut rng = Rng::new(seed);
    let (mut valid, mut invalid) = (0u64, 0u64);
    // Panics are caught and reported with their input; keep the default hook quiet meanwhile.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failure = None;
    for index in 0..count {
        let text = if rng.chance(90) {
            mutate(&mut rng, &example)
        } else {
            noise(&mut rng)
        };
        let why = match catch_unwind(AssertUnwindSafe(|| parse(&text, ORIGIN))) {
            Err(_) => Some("parse panicked".to_owned()),
            Ok(Ok(_)) => {
                valid += 1;
                None
            }
            Ok(Err(e)) => {
                invalid += 1;
                let message = e.to_string();
                let prefix = format!("{ORIGIN}:{}: ", e.line().unwrap_or(0));
                if message.contains('\n') {
                    Some(format!("error of more than one line: {message:?}"))
                } else if e.line().is_none() || !message.starts_with(&prefix) {
                    Some(format!("error without file:line: {message:?}"))
                } else {
                    None
                }
            }
        };
        if let Some(why) = why {
            failure = Some(format!(
                "{why}\n  seed {seed} index {index} (rerun: SLUICE_FUZZ_SEED={seed})\n  \
                 config:\n{text}"
            ));
            break;
        }
    }
    std::panic::set_hook(hook);
    if let Some(failure) = failure {
        panic!("{failure}");
    }
    println!("config fuzz: {valid} still valid, {invalid} rejected with one-line errors");
    assert!(
        invalid > count / 2,
        "the mutations should mostly break the file"
    );
}
