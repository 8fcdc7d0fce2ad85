//! Connections: short-lived TCP, one HTTP request each, with k6 (the load tester the seeds'
//! users ran) from a client namespace: at rising offered rates (k6's constant-arrival-rate) for the
//! lab's contenders, or at a fixed concurrency (constant-vus, closed loop) for the cluster path.
//!
//! Each k6 iteration opens a new connection (`noVUConnectionReuse`), sends one GET without
//! `Connection: close` and, after the answer, closes: the client closes first, as browsers and
//! pooled clients do. A proxy then closes its upstream connection first too, and that socket
//! waits in TIME_WAIT for 60 s holding its source port: the ephemeral-port exhaustion the seeds
//! saw. DNAT and sluice open no connection of their own.
//!
//! Errors are classified in the k6 script by the error text: "cannot assign requested address"
//! (EADDRNOTAVAIL), reset, refused, timeout, EOF (closed without an answer), other.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use sluice_tests::{HTTP_PORT, Lab, cmd};

use super::Plan;
use super::contenders::Active;

/// The error kinds the script counts, as k6 metric names (`err_<kind>`).
pub const ERROR_KINDS: [&str; 6] = [
    "eaddrnotavail",
    "reset",
    "refused",
    "timeout",
    "eof",
    "other",
];

/// One offered rate.
#[derive(Debug, Clone, Default)]
pub struct ConnStep {
    /// Offered new connections per second (0: a fixed concurrency, [`Load::Concurrency`]).
    pub offered: u32,
    pub seconds: f64,
    /// Answered requests (HTTP 200) per second.
    pub ok_per_s: f64,
    pub ok: u64,
    pub requests: u64,
    /// Iterations k6 could not even start (all its VUs busy): the client's own limit.
    pub dropped: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// (kind, count) in [`ERROR_KINDS`] order.
    pub errors: Vec<(String, u64)>,
    /// EADDRNOTAVAIL lines in the proxy's log during this step (proxies only).
    pub proxy_port_errors: Option<u64>,
    /// "no live upstreams" / "no server available" lines in the proxy's log during this step.
    pub proxy_no_backend: Option<u64>,
}

impl ConnStep {
    pub fn error_total(&self) -> u64 {
        self.errors.iter().map(|(_, n)| n).sum()
    }
    pub fn error_rate(&self) -> f64 {
        self.error_total() as f64 / self.requests.max(1) as f64
    }
    /// The kinds that occurred, e.g. "reset 3, timeout 1".
    pub fn error_kinds(&self) -> String {
        self.errors
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

const SCRIPT: &str = r#"import http from 'k6/http';
import { Counter } from 'k6/metrics';

const ok = new Counter('ok');
const errs = {
  eaddrnotavail: new Counter('err_eaddrnotavail'),
  reset: new Counter('err_reset'),
  refused: new Counter('err_refused'),
  timeout: new Counter('err_timeout'),
  eof: new Counter('err_eof'),
  other: new Counter('err_other'),
};

export const options = {
  discardResponseBodies: true,
  noVUConnectionReuse: true,
  summaryTrendStats: ['avg', 'p(50)', 'p(99)', 'max'],
  scenarios: {
    // CONCURRENCY set: that many VUs, each opening its next connection as soon as the last
    // answered (a closed loop: what the path sustains); else RATE new connections per second.
    conn: __ENV.CONCURRENCY ? {
      executor: 'constant-vus',
      vus: Number(__ENV.CONCURRENCY),
      duration: __ENV.DURATION,
      gracefulStop: '3s',
    } : {
      executor: 'constant-arrival-rate',
      rate: Number(__ENV.RATE),
      timeUnit: '1s',
      duration: __ENV.DURATION,
      preAllocatedVUs: Number(__ENV.VUS),
      maxVUs: Number(__ENV.MAXVUS),
      gracefulStop: '3s',
    },
  },
};

export default function () {
  const r = http.get(__ENV.URL, { timeout: '2s' });
  if (r.status === 200) { ok.add(1); return; }
  const e = (r.error || '').toLowerCase();
  if (e.includes('assign requested address')) errs.eaddrnotavail.add(1);
  else if (e.includes('reset')) errs.reset.add(1);
  else if (e.includes('refused')) errs.refused.add(1);
  else if (e.includes('timeout') || e.includes('deadline')) errs.timeout.add(1);
  else if (e.includes('eof')) errs.eof.add(1);
  else errs.other.add(1);
}
"#;

/// How k6 offers new connections.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// This many new connections per second (open loop; k6 adds VUs up to a bound).
    Rate(u32),
    /// This many connections at once, each followed by the next as soon as it answered
    /// (closed loop): the connections/s the path sustains at that concurrency.
    Concurrency(u32),
}

/// One k6 run from network namespace `ns` against `url` for `window`: one new TCP connection
/// per HTTP request. The script and k6's summary go to `dir` (`k6-<name>.json`). The measuring
/// core of both the lab's contenders and the cluster section.
pub fn run_k6(
    ns: &str,
    url: &str,
    load: Load,
    window: Duration,
    dir: &Path,
    name: &str,
) -> anyhow::Result<ConnStep> {
    let script = dir.join("bench-k6.js");
    fs::write(&script, SCRIPT)?;
    let summary = dir.join(format!("k6-{name}.json"));
    let _ = fs::remove_file(&summary);
    let secs = window.as_secs();
    let mut k6 = Command::new("ip");
    k6.args(["netns", "exec", ns, "k6", "run", "--quiet"])
        .args(["--no-usage-report", "--no-color"])
        .arg("--summary-export")
        .arg(&summary)
        .args(["-e", &format!("URL={url}")])
        .args(["-e", &format!("DURATION={secs}s")]);
    let offered = match load {
        Load::Rate(rate) => {
            // VUs: a connection takes ~1 ms when all is well; a failing one up to the 2 s timeout.
            let vus = (rate / 20).clamp(10, 200);
            let max_vus = (rate / 4).clamp(50, 600);
            k6.args(["-e", &format!("RATE={rate}")])
                .args(["-e", &format!("VUS={vus}")])
                .args(["-e", &format!("MAXVUS={max_vus}")]);
            rate
        }
        Load::Concurrency(n) => {
            k6.args(["-e", &format!("CONCURRENCY={n}")]);
            0
        }
    };
    k6.arg(&script).env("K6_NO_USAGE_REPORT", "true");
    let out = cmd::run(&mut k6, window + Duration::from_secs(60))?;
    let text = fs::read_to_string(&summary).with_context(|| {
        format!(
            "k6 wrote no summary (exit {}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        )
    })?;
    parse_summary(&text, offered, window.as_secs_f64())
}

/// Runs the plan's rates against the VIP with the contender in place.
pub fn measure(lab: &Lab, plan: &Plan, active: &Active<'_>) -> anyhow::Result<Vec<ConnStep>> {
    let url = format!("http://{}:{HTTP_PORT}/", lab.vip());
    let mut steps = Vec::new();
    for (i, &rate) in plan.conn_rates.iter().enumerate() {
        let before = (active.port_errors(), active.no_backend_errors());
        let mut step = run_k6(
            lab.client_ns(),
            &url,
            Load::Rate(rate),
            plan.conn_window,
            lab.dir(),
            &format!("{}-{i}", active.kind.key()),
        )?;
        let since = |b: Option<u64>, a: Option<u64>| Some(a?.saturating_sub(b?));
        step.proxy_port_errors = since(before.0, active.port_errors());
        step.proxy_no_backend = since(before.1, active.no_backend_errors());
        eprintln!(
            "[bench]   {rate:>5} conn/s offered: {:>7.0} ok/s, p50 {:.2} ms, p99 {:.2} ms, errors {} ({}), dropped by k6 {}{}",
            step.ok_per_s,
            step.p50_ms,
            step.p99_ms,
            step.error_total(),
            step.error_kinds(),
            step.dropped,
            step.proxy_port_errors.map_or(String::new(), |n| format!(
                ", proxy log: EADDRNOTAVAIL {n}, no backend left {}",
                step.proxy_no_backend.unwrap_or(0)
            ))
        );
        steps.push(step);
    }
    Ok(steps)
}

fn parse_summary(text: &str, rate: u32, seconds: f64) -> anyhow::Result<ConnStep> {
    let v: serde_json::Value = serde_json::from_str(text).context("k6 summary is not JSON")?;
    let m = v
        .get("metrics")
        .ok_or_else(|| anyhow!("k6 summary has no metrics"))?;
    let count = |name: &str| m[name]["count"].as_u64().unwrap_or(0);
    let ok = count("ok");
    let errors: Vec<(String, u64)> = ERROR_KINDS
        .iter()
        .map(|k| (k.to_string(), count(&format!("err_{k}"))))
        .collect();
    let d = &m["http_req_duration"];
    Ok(ConnStep {
        offered: rate,
        seconds,
        ok_per_s: ok as f64 / seconds,
        ok,
        requests: count("http_reqs"),
        dropped: count("dropped_iterations"),
        p50_ms: d["p(50)"].as_f64().unwrap_or(f64::NAN),
        p99_ms: d["p(99)"].as_f64().unwrap_or(f64::NAN),
        errors,
        proxy_port_errors: None,
        proxy_no_backend: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_k6_summary() {
        let text = r#"{"metrics": {
            "ok": {"count": 900, "rate": 90.0},
            "err_reset": {"count": 7, "rate": 0.7},
            "http_reqs": {"count": 907, "rate": 90.7},
            "dropped_iterations": {"count": 3, "rate": 0.3},
            "http_req_duration": {"avg": 1.0, "p(50)": 0.8, "p(99)": 4.5, "max": 9.0}
        }}"#;
        let s = parse_summary(text, 100, 10.0).unwrap();
        assert_eq!((s.ok, s.requests, s.dropped), (900, 907, 3));
        assert_eq!(s.error_total(), 7);
        assert_eq!(s.errors[1], ("reset".to_string(), 7));
        assert!((s.ok_per_s - 90.0).abs() < 1e-9);
        assert!((s.p99_ms - 4.5).abs() < 1e-9);
    }
}
