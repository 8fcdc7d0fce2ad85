//! `cargo xtask soak --minutes N`: sluice under mixed traffic and backend churn for a long while,
//! in the namespace lab (not part of `./x test`).
//!
//! `sluice run` balances the lab's VIP (tcp/80 nginx, tcp/7000 line echo, udp/5353) over N
//! backends while, from the client namespace only:
//! - a pool of long-lived TCP echo connections (one line every 100 ms each) is kept full: a
//!   connection that dies is classified (its backend was removed since it opened: expected;
//!   otherwise: a bug) and replaced;
//! - short HTTP requests (one TCP connection each) run at a modest rate;
//! - a steady UDP stream from a few sockets counts its answers.
//!
//! Every few seconds one backend changes (removed, drained, restored, re-weighted) by rewriting
//! the config `sluice run` was started with and sending SIGHUP; at least two backends stay
//! active. Every 10 s sluice's RSS, the connection-table entries and the backend slots are
//! sampled. The summary goes to stdout and `target/soak/report.json` (with sluice's log beside
//! it); the command fails when a connection was lost to a backend that was not removed, when
//! RSS grew by more than 20 % after the first minute, when backend slots leak or are not
//! reused, on a reconcile error, when sluice died, when a UDP request went unanswered, an HTTP
//! request failed, a long-lived connection failed to open, or one alive at the end had errors.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::ErrorKind;
use std::net::{SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};
use sluice_tests::{
    BackendSpec, ECHO_PORT, Lab, LabConfig, LongConn, SluiceProcess, UDP_PORT, cmd, lab::NS_IFACE,
    netns, require_root,
};

/// How often RSS, map sizes and counters are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// RSS growth is measured from the first sample after this warm-up (allocators, first scrapes).
const RSS_WARMUP: Duration = Duration::from_secs(60);
/// More RSS growth than this after the warm-up fails the soak.
const RSS_MAX_GROWTH: f64 = 0.20;
/// Where `sluice run` serves metrics (its default), inside the lb namespace.
const METRICS_ADDR: &str = "127.0.0.1:9477";
/// The UDP stream's sockets (each one flow, so several backends see it).
const UDP_SOCKETS: usize = 8;
/// How often each long-lived connection sends a line.
const LINE_INTERVAL: Duration = Duration::from_millis(100);
/// The main loop's period: how soon a lost connection is noticed and replaced.
const TICK: Duration = Duration::from_millis(100);
/// How long a SIGHUP may take to show up as a reload in sluice's log.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many messages of each kind are kept for the report.
const KEEP: usize = 20;

#[derive(clap::Args)]
pub struct Args {
    /// How long to run (the soak is at least 10 minutes).
    #[arg(long, default_value_t = 10)]
    minutes: u64,
    /// Lab backends.
    #[arg(long, default_value_t = 5)]
    backends: usize,
    /// Long-lived TCP echo connections kept open.
    #[arg(long, default_value_t = 20)]
    conns: usize,
    /// Seconds between backend changes.
    #[arg(long, default_value_t = 5)]
    churn_every: u64,
    /// UDP requests per second.
    #[arg(long, default_value_t = 300)]
    udp_rate: u32,
    /// HTTP requests per second (each on a new TCP connection).
    #[arg(long, default_value_t = 10)]
    http_rate: usize,
    /// sluice's connection-table size (default: sluice's own, 1M entries).
    #[arg(long)]
    flow_table_size: Option<u32>,
    /// Seed of the churn's random choices (default: from the clock; the report names it).
    #[arg(long)]
    seed: Option<u64>,
}

pub fn run(args: &Args) -> Result<()> {
    require_root();
    ensure!(args.minutes >= 1, "--minutes must be at least 1");
    ensure!(
        (3..=20).contains(&args.backends),
        "--backends must be 3..=20 (two stay active, one must be free to churn)"
    );
    ensure!(
        args.udp_rate >= 1 && args.http_rate >= 1 && args.churn_every >= 1,
        "--udp-rate, --http-rate and --churn-every must be at least 1"
    );
    crate::build_sluice()?;
    let out_dir = output_dir()?;
    fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let seed = args.seed.unwrap_or_else(clock_seed);
    println!(
        "soak: {} min, {} backends, {} long-lived connections, {} UDP/s, {} HTTP/s, a backend \
         change every {} s, seed {seed}",
        args.minutes, args.backends, args.conns, args.udp_rate, args.http_rate, args.churn_every
    );
    let lab = Lab::build(LabConfig {
        backends: args.backends,
        udp: true,
    })?;
    let outcome = soak(&lab, args, seed, &out_dir);
    drop(lab);
    let report = outcome?;
    let path = out_dir.join("report.json");
    fs::write(&path, serde_json::to_string_pretty(&report.json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("{}", report.table);
    println!("report: {}", path.display());
    if !report.failures.is_empty() {
        bail!("soak failed:\n  {}", report.failures.join("\n  "));
    }
    println!("soak passed");
    Ok(())
}

/// `target/soak`, next to the profile directory this xtask runs from.
fn output_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the running xtask executable")?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .with_context(|| format!("{} is not in target/<profile>/", exe.display()))?;
    Ok(target.join("soak"))
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// xorshift64*: reproducible choices from a seed, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

// ----- backend churn -----

/// One backend change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Remove(usize),
    Drain(usize),
    Undrain(usize),
    Readd(usize),
    Weight(usize, u32),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Remove(i) => write!(f, "remove b{i}"),
            Change::Drain(i) => write!(f, "drain b{i}"),
            Change::Undrain(i) => write!(f, "undrain b{i}"),
            Change::Readd(i) => write!(f, "re-add b{i}"),
            Change::Weight(i, w) => write!(f, "weight b{i} = {w}"),
        }
    }
}

/// The configured backends: `None` when removed.
struct Pool(Vec<Option<BackendSpec>>);

impl Pool {
    fn all_active(n: usize) -> Pool {
        Pool((0..n).map(|i| Some(BackendSpec::active(i))).collect())
    }

    fn specs(&self) -> Vec<BackendSpec> {
        self.0.iter().flatten().copied().collect()
    }

    fn is_active(&self, i: usize) -> bool {
        self.0[i].is_some_and(|b| !b.drain && b.weight > 0)
    }

    /// Backends that take new flows.
    fn active(&self) -> usize {
        (0..self.0.len()).filter(|&i| self.is_active(i)).count()
    }

    /// A random change among those that keep at least two backends active: first a kind
    /// (remove, drain, restore, re-weight), then one of its candidates.
    fn choose(&self, rng: &mut Rng) -> Change {
        let n = self.0.len();
        let spare = self.active() > 2;
        let removable: Vec<Change> = (0..n)
            .filter(|&i| self.0[i].is_some() && (spare || !self.is_active(i)))
            .map(Change::Remove)
            .collect();
        let drainable: Vec<Change> = (0..n)
            .filter(|&i| spare && self.is_active(i))
            .map(Change::Drain)
            .collect();
        let restorable: Vec<Change> = (0..n)
            .filter_map(|i| match self.0[i] {
                None => Some(Change::Readd(i)),
                Some(b) if b.drain => Some(Change::Undrain(i)),
                Some(_) => None,
            })
            .collect();
        let reweighable: Vec<Change> = (0..n)
            .filter_map(|i| self.0[i].filter(|b| !b.drain).map(|b| (i, b.weight)))
            .flat_map(|(i, w)| {
                (1..=4)
                    .filter(move |&x| x != w)
                    .map(move |x| Change::Weight(i, x))
            })
            .collect();
        let kinds: Vec<&Vec<Change>> = [&removable, &drainable, &restorable, &reweighable]
            .into_iter()
            .filter(|k| !k.is_empty())
            .collect();
        // Re-weighting is always possible (two backends are always active).
        let kind = kinds[rng.below(kinds.len())];
        kind[rng.below(kind.len())]
    }

    fn apply(&mut self, change: Change) {
        match change {
            Change::Remove(i) => self.0[i] = None,
            Change::Readd(i) => self.0[i] = Some(BackendSpec::active(i)),
            Change::Drain(i) | Change::Undrain(i) => {
                if let Some(b) = &mut self.0[i] {
                    b.drain = matches!(change, Change::Drain(_));
                }
            }
            Change::Weight(i, w) => {
                if let Some(b) = &mut self.0[i] {
                    b.weight = w;
                }
            }
        }
    }

    fn describe(&self) -> String {
        self.0
            .iter()
            .enumerate()
            .map(|(i, b)| match b {
                None => format!("b{i}:-"),
                Some(b) if b.drain => format!("b{i}:drain"),
                Some(b) => format!("b{i}:{}", b.weight),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `sluice run` and the config file it re-reads on SIGHUP.
struct Sluice<'a> {
    lab: &'a Lab,
    process: SluiceProcess,
    config: PathBuf,
    flow_table_size: Option<u32>,
}

/// Log lines that end a reload (either way).
fn reload_lines(log: &str) -> usize {
    log.lines()
        .filter(|l| {
            l.contains("reloaded ") || l.contains("reload of ") || l.contains("reload refused")
        })
        .count()
}

impl Sluice<'_> {
    /// Rewrites the config (atomically, by rename) and sends SIGHUP; returns once sluice's log
    /// shows the reload done, with how long that took and whether it failed.
    fn reload(&mut self, specs: &[BackendSpec]) -> Result<(Duration, Option<String>)> {
        let new = self.lab.write_config_with(specs, self.flow_table_size)?;
        fs::rename(&new, &self.config)
            .with_context(|| format!("replacing {} by {}", self.config.display(), new.display()))?;
        let before = reload_lines(&self.process.log_text());
        let sent = Instant::now();
        cmd::signal(self.process.pid(), libc::SIGHUP);
        loop {
            let log = self.process.log_text();
            if reload_lines(&log) > before {
                let last = log
                    .lines()
                    .rfind(|l| l.contains("reload"))
                    .unwrap_or_default()
                    .to_owned();
                let failed = !last.contains("reloaded ");
                return Ok((sent.elapsed(), failed.then_some(last)));
            }
            if let Some(status) = self.process.try_wait()? {
                bail!(
                    "sluice exited ({status}) during a reload: {}",
                    tail(&log, 20)
                );
            }
            ensure!(
                sent.elapsed() < RELOAD_TIMEOUT,
                "sluice did not log a reload within {RELOAD_TIMEOUT:?} of SIGHUP: {}",
                tail(&log, 20)
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ----- traffic -----

/// What the UDP stream has seen so far.
#[derive(Default)]
struct UdpStats {
    sent: AtomicU64,
    answered: AtomicU64,
    send_errors: AtomicU64,
    longest_gap_ms: AtomicU64,
    /// When (ms after the stream started) the longest gap ended: to match with the churn log.
    longest_gap_end_ms: AtomicU64,
    /// The longest time the stream's own loop did not run (the host's scheduling, not sluice).
    longest_stall_ms: AtomicU64,
    by_backend: Mutex<BTreeMap<String, u64>>,
}

/// Sends `rate` datagrams a second to VIP:UDP_PORT, round robin over [`UDP_SOCKETS`] sockets,
/// and counts the answers, until `stop` (then it waits one more second for late answers).
fn udp_stream(
    lab: &Lab,
    rate: u32,
    stop: Arc<AtomicBool>,
    stats: Arc<UdpStats>,
    max: Duration,
) -> Result<thread::JoinHandle<Result<()>>> {
    let target = SocketAddrV4::new(lab.vip(), UDP_PORT);
    netns::spawn_in(lab.client_ns(), "soak-udp", move || {
        let socks = (0..UDP_SOCKETS)
            .map(|_| {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.connect(target)?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
            .collect::<std::io::Result<Vec<_>>>()
            .context("UDP sockets in the client namespace")?;
        let period = Duration::from_secs_f64(1.0 / f64::from(rate));
        let start = Instant::now();
        let (mut next_send, mut last_answer, mut k) = (start, start, 0usize);
        let mut stopped_at: Option<Instant> = None;
        let mut buf = [0u8; 64];
        let mut last_loop = start;
        loop {
            let now = Instant::now();
            let stall = (now - last_loop).as_millis() as u64;
            stats.longest_stall_ms.fetch_max(stall, Ordering::Relaxed);
            last_loop = now;
            match stopped_at {
                None if stop.load(Ordering::SeqCst) || now - start >= max => stopped_at = Some(now),
                Some(t) if now - t >= Duration::from_secs(1) => break,
                _ => {}
            }
            while stopped_at.is_none() && Instant::now() >= next_send {
                let sock = &socks[k % socks.len()];
                match sock.send(format!("q{k}").as_bytes()) {
                    Ok(_) => stats.sent.fetch_add(1, Ordering::Relaxed),
                    Err(_) => stats.send_errors.fetch_add(1, Ordering::Relaxed),
                };
                k += 1;
                next_send += period;
            }
            for sock in &socks {
                loop {
                    match sock.recv(&mut buf) {
                        Ok(len) => {
                            stats.answered.fetch_add(1, Ordering::Relaxed);
                            let gap = last_answer.elapsed().as_millis() as u64;
                            if gap > stats.longest_gap_ms.fetch_max(gap, Ordering::Relaxed) {
                                let at = start.elapsed().as_millis() as u64;
                                stats.longest_gap_end_ms.store(at, Ordering::Relaxed);
                            }
                            last_answer = Instant::now();
                            let name = String::from_utf8_lossy(&buf[..len]).trim().to_owned();
                            if let Ok(mut m) = stats.by_backend.lock() {
                                *m.entry(name).or_default() += 1;
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        // An ICMP error queued on the socket: the datagram it is about is
                        // counted as unanswered anyway.
                        Err(_) => break,
                    }
                }
            }
            thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    })
}

/// What the HTTP loop has seen so far.
#[derive(Default)]
struct HttpStats {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

/// `rate` requests every second (one curl batch) until `stop`.
fn http_loop(lab: &Lab, rate: usize, stop: &AtomicBool, stats: &HttpStats, started: Instant) {
    while !stop.load(Ordering::SeqCst) {
        let t0 = Instant::now();
        match lab.curl(lab.vip(), rate) {
            Ok(r) => {
                stats.ok.fetch_add(r.bodies.len() as u64, Ordering::Relaxed);
                stats.failed.fetch_add(r.failures as u64, Ordering::Relaxed);
                if r.failures > 0 {
                    keep(
                        &stats.errors,
                        format!(
                            "{:.1}s: {} of {rate} failed: {}",
                            started.elapsed().as_secs_f64(),
                            r.failures,
                            r.stderr.lines().next().unwrap_or("(no message)")
                        ),
                    );
                }
            }
            Err(e) => {
                stats.failed.fetch_add(rate as u64, Ordering::Relaxed);
                keep(
                    &stats.errors,
                    format!("{:.1}s: curl: {e:#}", started.elapsed().as_secs_f64()),
                );
            }
        }
        let next = t0 + Duration::from_secs(1);
        while !stop.load(Ordering::SeqCst) && Instant::now() < next {
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn keep(list: &Mutex<Vec<String>>, msg: String) {
    if let Ok(mut l) = list.lock()
        && l.len() < KEEP
    {
        l.push(msg);
    }
}

/// One long-lived connection of the pool.
struct Tracked {
    conn: LongConn,
    backend: Option<usize>,
    opened: Instant,
}

/// Lost connections, by cause.
#[derive(Default)]
struct Losses {
    expected: u64,
    unexpected: u64,
    /// Connections open on a backend when it was removed (each should be lost, expectedly).
    on_removed_backend: u64,
    details: Vec<Value>,
}

// ----- sampling -----

#[derive(Debug, Clone)]
struct Sample {
    t: f64,
    rss_kib: u64,
    /// The heap and other anonymous memory (RSS also counts the binary's pages as they are touched).
    rss_anon_kib: u64,
    flows: u64,
    slots: usize,
    max_slot: u64,
    conns: usize,
    udp_sent: u64,
    udp_answered: u64,
    http_ok: u64,
    http_failed: u64,
    reconciles_ok: u64,
    reconciles_error: u64,
}

/// (VmRSS, RssAnon) of a process, in KiB.
fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (did sluice exit?)"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("RssAnon:")?))
}

fn metric_sum(m: &BTreeMap<String, f64>, prefix: &str) -> u64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| *v as u64)
        .sum()
}

/// Backend rows (VIP x backend) and the highest backend entry id, from `sluice inspect
/// backends -o json`: the ids must stay bounded through churn (entries are reused).
fn backend_slots(lab: &Lab) -> Result<(usize, u64)> {
    let out = lab.sluice_ok(&["inspect", "backends", "--iface", NS_IFACE, "-o", "json"])?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .context("`sluice inspect backends -o json` did not print JSON")?;
    let rows = v["backends"]
        .as_array()
        .context("`sluice inspect backends -o json`: no backends array")?;
    let max_slot = rows.iter().filter_map(|r| r["backend_id"].as_u64()).max();
    Ok((rows.len(), max_slot.unwrap_or(0)))
}

// ----- the run -----

struct Report {
    json: Value,
    table: String,
    failures: Vec<String>,
}

fn soak(lab: &Lab, args: &Args, seed: u64, out_dir: &Path) -> Result<Report> {
    let duration = Duration::from_secs(args.minutes * 60);
    let mut pool = Pool::all_active(args.backends);
    let config = lab.write_config_with(&pool.specs(), args.flow_table_size)?;
    let process = lab.run_sluice_with(&config, Duration::from_secs(60))?;
    let pid = process.pid();
    // `ip netns exec` execs sluice: the child's pid is sluice's.
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    ensure!(
        comm.trim() == "sluice",
        "pid {pid} is {:?}, not sluice: cannot sample its memory",
        comm.trim()
    );
    let mut sluice = Sluice {
        lab,
        process,
        config,
        flow_table_size: args.flow_table_size,
    };
    let started = Instant::now();
    let deadline = started + duration;
    let echo = SocketAddrV4::new(lab.vip(), ECHO_PORT);
    // Every thread below stops by this flag, or by its own bound at the latest.
    let stop = Arc::new(AtomicBool::new(false));
    let udp = Arc::new(UdpStats::default());
    let http = HttpStats::default();
    let udp_thread = udp_stream(
        lab,
        args.udp_rate,
        stop.clone(),
        udp.clone(),
        duration + Duration::from_secs(60),
    )?;

    let mut rng = Rng::new(seed);
    let mut conns: Vec<Tracked> = Vec::new();
    let mut losses = Losses::default();
    let mut removals: Vec<(Instant, usize)> = Vec::new();
    let mut opened = 0u64;
    let mut open_failures: Vec<String> = Vec::new();
    let mut open_failed = 0u64;
    let mut churn: Vec<Value> = Vec::new();
    let mut reload_times: Vec<Duration> = Vec::new();
    let mut reload_errors: Vec<String> = Vec::new();
    let mut samples: Vec<Sample> = Vec::new();
    let mut next_churn = started + Duration::from_secs(args.churn_every);
    let mut next_sample = started;

    let run = thread::scope(|s| -> Result<()> {
        let http_thread = s.spawn(|| http_loop(lab, args.http_rate, &stop, &http, started));
        let result = (|| -> Result<()> {
            loop {
                let now = Instant::now();
                // Connections that stopped: classify, then refill the pool.
                let mut i = 0;
                while i < conns.len() {
                    if conns[i].conn.snapshot().running {
                        i += 1;
                        continue;
                    }
                    let t = conns.swap_remove(i);
                    let report = t.conn.finish();
                    if report.errors.is_empty() {
                        continue; // ran out its time: not a loss
                    }
                    let expected = t
                        .backend
                        .is_some_and(|b| removals.iter().any(|&(at, r)| r == b && at > t.opened));
                    if expected {
                        losses.expected += 1;
                    } else {
                        losses.unexpected += 1;
                        eprintln!(
                            "UNEXPECTED: connection {} on b{:?} lost: {}",
                            report.target,
                            t.backend,
                            report.errors.join("; ")
                        );
                    }
                    if losses.details.len() < 200 {
                        losses.details.push(json!({
                            "t": round1(started.elapsed().as_secs_f64()),
                            "backend": t.backend.map(|b| format!("b{b}")),
                            "target": report.target,
                            "age_s": round1(t.opened.elapsed().as_secs_f64()),
                            "expected": expected,
                            "errors": report.errors.iter().take(3).collect::<Vec<_>>(),
                        }));
                    }
                }
                if now >= deadline {
                    break;
                }
                while conns.len() < args.conns {
                    let opened_at = Instant::now();
                    match LongConn::open(
                        lab.client_ns(),
                        echo,
                        LINE_INTERVAL,
                        duration + Duration::from_secs(600),
                        Arc::new(AtomicBool::new(false)),
                    ) {
                        Ok(conn) => {
                            opened += 1;
                            let backend = lab.backend_index(&conn.backend());
                            conns.push(Tracked {
                                conn,
                                backend,
                                opened: opened_at,
                            });
                        }
                        Err(e) => {
                            open_failed += 1;
                            if open_failures.len() < KEEP {
                                open_failures.push(format!(
                                    "{:.1}s: {e:#}",
                                    started.elapsed().as_secs_f64()
                                ));
                            }
                            break;
                        }
                    }
                }
                if now >= next_churn {
                    next_churn += Duration::from_secs(args.churn_every);
                    let change = pool.choose(&mut rng);
                    pool.apply(change);
                    let (took, failed) = sluice.reload(&pool.specs())?;
                    reload_times.push(took);
                    if let Some(line) = failed {
                        keep_vec(&mut reload_errors, line);
                    }
                    if let Change::Remove(b) = change {
                        removals.push((Instant::now(), b));
                        losses.on_removed_backend +=
                            conns.iter().filter(|c| c.backend == Some(b)).count() as u64;
                    }
                    churn.push(json!({
                        "t": round1(started.elapsed().as_secs_f64()),
                        "change": change.to_string(),
                        "backends": pool.describe(),
                        "reload_ms": round1(took.as_secs_f64() * 1e3),
                    }));
                }
                if now >= next_sample {
                    next_sample += SAMPLE_EVERY;
                    let sample = take_sample(lab, &sluice, started, &conns, &udp, &http)?;
                    print_sample(&sample, &losses, churn.len());
                    samples.push(sample);
                }
                if let Some(status) = sluice.process.try_wait()? {
                    bail!(
                        "sluice exited ({status}) during the soak: {}",
                        tail(&sluice.process.log_text(), 20)
                    );
                }
                thread::sleep(TICK);
            }
            Ok(())
        })();
        stop.store(true, Ordering::SeqCst);
        if http_thread.join().is_err() {
            bail!("the HTTP loop panicked");
        }
        result
    });
    stop.store(true, Ordering::SeqCst);
    let udp_result = udp_thread.join();
    let log = sluice.process.log_text();
    let _ = fs::write(out_dir.join("sluice.log"), &log);
    run?;
    match udp_result {
        Ok(r) => r.context("the UDP stream")?,
        Err(_) => bail!("the UDP stream panicked"),
    }

    // The last sample, while the pool is still open; then the survivors' reports.
    let last = take_sample(lab, &sluice, started, &conns, &udp, &http)?;
    print_sample(&last, &losses, churn.len());
    samples.push(last);
    let survivors = conns.len();
    let mut stalls: Vec<String> = Vec::new();
    for t in conns.drain(..) {
        let r = t.conn.finish();
        if !r.errors.is_empty() {
            keep_vec(
                &mut stalls,
                format!("{} on b{:?}: {}", r.target, t.backend, r.errors.join("; ")),
            );
        }
    }
    let flows_by_inspect = lab
        .sluice_ok(&[
            "inspect", "flows", "--iface", NS_IFACE, "--limit", "0", "-o", "json",
        ])
        .ok()
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
        .and_then(|v| v["total"].as_u64());
    let alive = sluice.process.try_wait()?.is_none();
    let _ = sluice.process.stop(Duration::from_secs(10));

    let log_errors: Vec<String> = log
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
        .take(KEEP)
        .map(str::to_owned)
        .collect();
    let log_error_count = log
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains(" WARN "))
        .count();

    Ok(summarize(Summary {
        args,
        seed,
        elapsed: started.elapsed(),
        samples,
        losses,
        opened,
        open_failed,
        open_failures,
        survivors,
        stalls,
        udp: &udp,
        http: &http,
        churn,
        reload_times,
        reload_errors,
        log_errors,
        log_error_count,
        flows_by_inspect,
        sluice_alive: alive,
    }))
}

fn keep_vec(list: &mut Vec<String>, msg: String) {
    if list.len() < KEEP {
        list.push(msg);
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn take_sample(
    lab: &Lab,
    sluice: &Sluice,
    started: Instant,
    conns: &[Tracked],
    udp: &UdpStats,
    http: &HttpStats,
) -> Result<Sample> {
    let m = lab.metrics(METRICS_ADDR)?;
    let (slots, max_slot) = backend_slots(lab)?;
    let (rss_kib, rss_anon_kib) = rss_kib(sluice.process.pid())?;
    Ok(Sample {
        t: round1(started.elapsed().as_secs_f64()),
        rss_kib,
        rss_anon_kib,
        flows: metric_sum(&m, "sluice_flows{"),
        slots,
        max_slot,
        conns: conns.len(),
        udp_sent: udp.sent.load(Ordering::Relaxed),
        udp_answered: udp.answered.load(Ordering::Relaxed),
        http_ok: http.ok.load(Ordering::Relaxed),
        http_failed: http.failed.load(Ordering::Relaxed),
        reconciles_ok: metric_sum(&m, "sluice_reconciles_total{result=\"ok\"}"),
        reconciles_error: metric_sum(&m, "sluice_reconciles_total{result=\"error\"}"),
    })
}

fn print_sample(s: &Sample, losses: &Losses, changes: usize) {
    println!(
        "[{:>6.1}s] rss {:>6} KiB (anon {:>5})  flows {:>6}  slots {:>2}  conns {:>3}  lost {} (unexpected {})  \
         udp {}/{}  http {}/{}  changes {changes}",
        s.t,
        s.rss_kib,
        s.rss_anon_kib,
        s.flows,
        s.slots,
        s.conns,
        losses.expected + losses.unexpected,
        losses.unexpected,
        s.udp_answered,
        s.udp_sent,
        s.http_ok,
        s.http_ok + s.http_failed,
    );
}

struct Summary<'a> {
    args: &'a Args,
    seed: u64,
    elapsed: Duration,
    samples: Vec<Sample>,
    losses: Losses,
    opened: u64,
    open_failed: u64,
    open_failures: Vec<String>,
    survivors: usize,
    stalls: Vec<String>,
    udp: &'a UdpStats,
    http: &'a HttpStats,
    churn: Vec<Value>,
    reload_times: Vec<Duration>,
    reload_errors: Vec<String>,
    log_errors: Vec<String>,
    log_error_count: usize,
    flows_by_inspect: Option<u64>,
    sluice_alive: bool,
}

/// Least-squares slope of (t seconds, value) in value per minute.
fn slope_per_min(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    (den > 0.0).then(|| num / den * 60.0)
}

fn summarize(s: Summary) -> Report {
    let mut failures = Vec::new();
    let first = s.samples.first().cloned();
    let last = s.samples.last().cloned();
    let rss: Vec<u64> = s.samples.iter().map(|x| x.rss_kib).collect();
    let rss_max = rss.iter().copied().max().unwrap_or(0);
    let warm: Vec<&Sample> = s
        .samples
        .iter()
        .filter(|x| x.t >= RSS_WARMUP.as_secs_f64())
        .collect();
    let rss_slope = slope_per_min(
        &warm
            .iter()
            .map(|x| (x.t, x.rss_kib as f64))
            .collect::<Vec<_>>(),
    );
    // Growth from the first sample after the warm-up to the last one.
    let rss_growth = match (warm.first(), warm.last()) {
        (Some(a), Some(b)) if warm.len() >= 2 && a.rss_kib > 0 => {
            Some((b.rss_kib as f64 - a.rss_kib as f64) / a.rss_kib as f64)
        }
        _ => None,
    };
    match rss_growth {
        Some(g) if g > RSS_MAX_GROWTH => failures.push(format!(
            "sluice's RSS grew by {:.1} % after the first minute (limit {:.0} %)",
            g * 100.0,
            RSS_MAX_GROWTH * 100.0
        )),
        _ => {}
    }
    if s.losses.unexpected > 0 {
        failures.push(format!(
            "{} established connections lost to backends that were not removed",
            s.losses.unexpected
        ));
    }
    // Three VIPs, each with at most every backend.
    let slot_bound = 3 * s.args.backends;
    let slots_max = s.samples.iter().map(|x| x.slots).max().unwrap_or(0);
    let max_slot_id = s.samples.iter().map(|x| x.max_slot).max().unwrap_or(0);
    if slots_max > slot_bound {
        failures.push(format!(
            "{slots_max} backend slots in use, more than the {slot_bound} configured at most"
        ));
    }
    let reconcile_errors = last.as_ref().map_or(0, |l| l.reconciles_error);
    if reconcile_errors > 0 || !s.reload_errors.is_empty() {
        failures.push(format!(
            "{reconcile_errors} reconcile errors (metrics); failed reloads: {}",
            s.reload_errors.join(" | ")
        ));
    }
    if !s.sluice_alive {
        failures.push("sluice was not running at the end".into());
    }
    // Freed slots are reused (lowest free first, never within the plan that freed them): the
    // ids in use never exceed what is in use at once, at most `slot_bound`. Ids beyond it mean
    // freed slots are abandoned and the array runs out after enough churn.
    if s.samples.iter().any(|x| x.slots > 0) && max_slot_id >= slot_bound as u64 {
        failures.push(format!(
            "highest backend slot id {max_slot_id} with at most {slot_bound} slots in use: freed \
             slots are not reused"
        ));
    }
    // Traffic that must all get through: every VIP packet reaches a backend that answers (a
    // removed backend still answers in the lab), so any loss is sluice's.
    let udp_unanswered = s
        .udp
        .sent
        .load(Ordering::Relaxed)
        .saturating_sub(s.udp.answered.load(Ordering::Relaxed));
    let udp_send_errors = s.udp.send_errors.load(Ordering::Relaxed);
    if udp_unanswered > 0 || udp_send_errors > 0 {
        failures.push(format!(
            "UDP: {udp_unanswered} requests unanswered, {udp_send_errors} send errors"
        ));
    }
    let http_failures = s.http.failed.load(Ordering::Relaxed);
    if http_failures > 0 {
        let first = s
            .http
            .errors
            .lock()
            .map(|e| e.join(" | "))
            .unwrap_or_default();
        failures.push(format!("HTTP: {http_failures} requests failed: {first}"));
    }
    if !s.stalls.is_empty() {
        failures.push(format!(
            "{} connections alive at the end had errors (stalled or garbled echoes): {}",
            s.stalls.len(),
            s.stalls.join(" | ")
        ));
    }
    if s.open_failed > 0 {
        failures.push(format!(
            "{} long-lived connections failed to open: {}",
            s.open_failed,
            s.open_failures.join(" | ")
        ));
    }
    let flows: Vec<u64> = s.samples.iter().map(|x| x.flows).collect();
    let flows_max = flows.iter().copied().max().unwrap_or(0);
    let flows_slope = slope_per_min(
        &s.samples
            .iter()
            .map(|x| (x.t, x.flows as f64))
            .collect::<Vec<_>>(),
    );
    let udp_sent = s.udp.sent.load(Ordering::Relaxed);
    let udp_answered = s.udp.answered.load(Ordering::Relaxed);
    let http_ok = s.http.ok.load(Ordering::Relaxed);
    let http_failed = s.http.failed.load(Ordering::Relaxed);
    let http_errors = s.http.errors.lock().map(|e| e.clone()).unwrap_or_default();
    let udp_by_backend = s
        .udp
        .by_backend
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    let reload_ms: Vec<f64> = s
        .reload_times
        .iter()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    let reload_mean = if reload_ms.is_empty() {
        0.0
    } else {
        reload_ms.iter().sum::<f64>() / reload_ms.len() as f64
    };
    let reload_max = reload_ms.iter().copied().fold(0.0, f64::max);
    let count = |kind: &str| {
        s.churn
            .iter()
            .filter(|c| c["change"].as_str().is_some_and(|x| x.starts_with(kind)))
            .count()
    };

    let json = json!({
        "duration_s": round1(s.elapsed.as_secs_f64()),
        "seed": s.seed,
        "settings": {
            "minutes": s.args.minutes, "backends": s.args.backends, "conns": s.args.conns,
            "churn_every_s": s.args.churn_every, "udp_rate": s.args.udp_rate,
            "http_rate": s.args.http_rate, "flow_table_size": s.args.flow_table_size,
        },
        "passed": failures.is_empty(),
        "failures": failures,
        "tcp_long_lived": {
            "opened": s.opened,
            "open_failed": s.open_failed,
            "open_failures": s.open_failures,
            "lost_backend_removed": s.losses.expected,
            "lost_unexpected": s.losses.unexpected,
            "open_on_backend_at_its_removal": s.losses.on_removed_backend,
            "alive_at_end": s.survivors,
            "anomalies_on_survivors": s.stalls,
            "losses": s.losses.details,
        },
        "udp": {
            "sent": udp_sent,
            "answered": udp_answered,
            "unanswered": udp_sent.saturating_sub(udp_answered),
            "send_errors": s.udp.send_errors.load(Ordering::Relaxed),
            "longest_gap_ms": s.udp.longest_gap_ms.load(Ordering::Relaxed),
            "longest_gap_ended_at_s": round1(s.udp.longest_gap_end_ms.load(Ordering::Relaxed) as f64 / 1e3),
            "longest_sender_stall_ms": s.udp.longest_stall_ms.load(Ordering::Relaxed),
            "answers_by_backend": udp_by_backend,
        },
        "http": { "ok": http_ok, "failed": http_failed, "errors": http_errors },
        "rss_kib": {
            "first": rss.first(), "max": rss_max, "last": rss.last(),
            "after_warmup": warm.first().map(|x| x.rss_kib),
            "anon_first": s.samples.first().map(|x| x.rss_anon_kib),
            "anon_last": s.samples.last().map(|x| x.rss_anon_kib),
            "growth_after_warmup_pct": rss_growth.map(|g| round1(g * 100.0)),
            "slope_kib_per_min_after_warmup": rss_slope.map(round1),
        },
        "maps": {
            "flows_first": first.as_ref().map(|x| x.flows),
            "flows_max": flows_max,
            "flows_last": last.as_ref().map(|x| x.flows),
            "flows_by_inspect_at_end": s.flows_by_inspect,
            "flows_slope_per_min": flows_slope.map(round1),
            "backend_slots_max": slots_max,
            "backend_slots_bound": slot_bound,
            "highest_slot_id": max_slot_id,
        },
        "churn": {
            "changes": s.churn.len(),
            "removed": count("remove"), "drained": count("drain"), "undrained": count("undrain"),
            "re_added": count("re-add"), "reweighted": count("weight"),
            "reload_ms_mean": round1(reload_mean), "reload_ms_max": round1(reload_max),
            "reloads_failed": s.reload_errors,
            "reconciles_ok": last.as_ref().map(|x| x.reconciles_ok),
            "reconciles_error": reconcile_errors,
            "log": s.churn,
        },
        "sluice_log_warnings": { "count": s.log_error_count, "first": s.log_errors },
        "samples": s.samples.iter().map(|x| json!({
            "t": x.t, "rss_kib": x.rss_kib, "rss_anon_kib": x.rss_anon_kib, "flows": x.flows, "slots": x.slots,
            "conns": x.conns, "udp_sent": x.udp_sent, "udp_answered": x.udp_answered,
            "http_ok": x.http_ok, "http_failed": x.http_failed,
            "reconciles_ok": x.reconciles_ok, "reconciles_error": x.reconciles_error,
        })).collect::<Vec<_>>(),
    });

    let opt = |v: Option<f64>, unit: &str| v.map_or("n/a".to_owned(), |v| format!("{v:.1}{unit}"));
    let rows: Vec<(&str, String)> = vec![
        (
            "duration",
            format!("{:.0} s, seed {}", s.elapsed.as_secs_f64(), s.seed),
        ),
        (
            "backend changes",
            format!(
                "{} (remove {}, drain {}, undrain {}, re-add {}, weight {}); reload mean {:.0} ms, max {:.0} ms",
                s.churn.len(),
                count("remove"),
                count("drain"),
                count("undrain"),
                count("re-add"),
                count("weight"),
                reload_mean,
                reload_max
            ),
        ),
        (
            "TCP long-lived",
            format!(
                "{} opened ({} failed to open), {} alive at the end",
                s.opened, s.open_failed, s.survivors
            ),
        ),
        (
            "  lost, backend removed",
            format!(
                "{} (connections on a backend when it was removed: {})",
                s.losses.expected, s.losses.on_removed_backend
            ),
        ),
        ("  lost, otherwise (bug)", s.losses.unexpected.to_string()),
        ("  anomalies on survivors", s.stalls.len().to_string()),
        (
            "UDP",
            format!(
                "{udp_sent} sent, {udp_answered} answered ({} unanswered); longest gap without \
                 an answer {} ms (ended at {:.1} s; the sender itself stalled up to {} ms)",
                udp_sent.saturating_sub(udp_answered),
                s.udp.longest_gap_ms.load(Ordering::Relaxed),
                s.udp.longest_gap_end_ms.load(Ordering::Relaxed) as f64 / 1e3,
                s.udp.longest_stall_ms.load(Ordering::Relaxed)
            ),
        ),
        ("HTTP", format!("{http_ok} ok, {http_failed} failed")),
        (
            "sluice RSS (KiB)",
            format!(
                "first {}, max {rss_max}, last {} (anonymous {} -> {}); after 1 min: growth {}, slope {}",
                rss.first().copied().unwrap_or(0),
                rss.last().copied().unwrap_or(0),
                first.as_ref().map_or(0, |x| x.rss_anon_kib),
                last.as_ref().map_or(0, |x| x.rss_anon_kib),
                opt(rss_growth.map(|g| g * 100.0), " %"),
                opt(rss_slope, " KiB/min")
            ),
        ),
        (
            "connection table",
            format!(
                "first {}, max {flows_max}, last {} entries ({}/min); capacity {}",
                first.as_ref().map_or(0, |x| x.flows),
                last.as_ref().map_or(0, |x| x.flows),
                opt(flows_slope, ""),
                s.args
                    .flow_table_size
                    .map_or("1048576 (default)".to_owned(), |n| n.to_string())
            ),
        ),
        (
            "backend slots",
            format!("max {slots_max} in use (bound {slot_bound}), highest slot id {max_slot_id}"),
        ),
        (
            "reconciles",
            format!(
                "{} ok, {reconcile_errors} errors; sluice log warnings/errors: {}",
                last.as_ref().map_or(0, |x| x.reconciles_ok),
                s.log_error_count
            ),
        ),
        (
            "result",
            if failures.is_empty() {
                "PASS".to_owned()
            } else {
                format!("FAIL: {}", failures.join("; "))
            },
        ),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut table = String::from("\nsoak summary\n");
    for (k, v) in rows {
        table.push_str(&format!("  {k:<width$}  {v}\n"));
    }
    Report {
        json,
        table,
        failures,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn churn_keeps_two_active_and_covers_every_kind() {
        let mut pool = Pool::all_active(5);
        let mut rng = Rng::new(7);
        let mut seen = [false; 5];
        for _ in 0..2000 {
            let c = pool.choose(&mut rng);
            seen[match c {
                Change::Remove(_) => 0,
                Change::Drain(_) => 1,
                Change::Undrain(_) => 2,
                Change::Readd(_) => 3,
                Change::Weight(..) => 4,
            }] = true;
            pool.apply(c);
            assert!(pool.active() >= 2, "{} after {c}", pool.describe());
        }
        assert_eq!(seen, [true; 5]);
    }

    #[test]
    fn slope_is_per_minute() {
        let s = slope_per_min(&[(0.0, 100.0), (60.0, 110.0), (120.0, 120.0)]);
        assert!((s.unwrap() - 10.0).abs() < 1e-9);
        assert_eq!(slope_per_min(&[(0.0, 1.0)]), None);
    }

    fn args() -> Args {
        Args {
            minutes: 1,
            backends: 5,
            conns: 20,
            churn_every: 5,
            udp_rate: 300,
            http_rate: 10,
            flow_table_size: None,
            seed: Some(1),
        }
    }

    fn sample(t: f64, slots: usize, max_slot: u64) -> Sample {
        Sample {
            t,
            rss_kib: 10_000,
            rss_anon_kib: 2_000,
            flows: 100,
            slots,
            max_slot,
            conns: 20,
            udp_sent: 0,
            udp_answered: 0,
            http_ok: 0,
            http_failed: 0,
            reconciles_ok: 10,
            reconciles_error: 0,
        }
    }

    type Spoil = Box<dyn FnOnce(&mut Summary, &UdpStats, &HttpStats)>;

    /// The failures `summarize` finds in a run that is clean except for what `spoil` changes.
    fn failures_of(spoil: impl FnOnce(&mut Summary, &UdpStats, &HttpStats)) -> Vec<String> {
        let args = args();
        let (udp, http) = (UdpStats::default(), HttpStats::default());
        udp.sent.store(1000, Ordering::Relaxed);
        udp.answered.store(1000, Ordering::Relaxed);
        http.ok.store(600, Ordering::Relaxed);
        let mut s = Summary {
            args: &args,
            seed: 1,
            elapsed: Duration::from_secs(60),
            samples: (0..7)
                .map(|i| sample(f64::from(i) * 10.0, 15, 14))
                .collect(),
            losses: Losses::default(),
            opened: 20,
            open_failed: 0,
            open_failures: Vec::new(),
            survivors: 20,
            stalls: Vec::new(),
            udp: &udp,
            http: &http,
            churn: Vec::new(),
            reload_times: Vec::new(),
            reload_errors: Vec::new(),
            log_errors: Vec::new(),
            log_error_count: 0,
            flows_by_inspect: Some(100),
            sluice_alive: true,
        };
        spoil(&mut s, &udp, &http);
        summarize(s).failures
    }

    #[test]
    fn a_clean_run_passes_and_each_reported_fault_fails_it() {
        assert_eq!(failures_of(|_, _, _| {}), Vec::<String>::new());
        let cases: [(&str, Spoil); 6] = [
            (
                "UDP",
                Box::new(|_, u, _| u.answered.store(999, Ordering::Relaxed)),
            ),
            (
                "UDP",
                Box::new(|_, u, _| u.send_errors.store(1, Ordering::Relaxed)),
            ),
            (
                "HTTP",
                Box::new(|_, _, h| h.failed.store(1, Ordering::Relaxed)),
            ),
            (
                "alive at the end had errors",
                Box::new(|s, _, _| s.stalls.push("seq 7: no echo".into())),
            ),
            ("failed to open", Box::new(|s, _, _| s.open_failed = 1)),
            (
                "not reused",
                Box::new(|s, _, _| s.samples.push(sample(70.0, 15, 17))),
            ),
        ];
        for (what, spoil) in cases {
            let failures = failures_of(spoil);
            assert!(
                failures.len() == 1 && failures[0].contains(what),
                "{what}: {failures:?}"
            );
        }
    }
}
