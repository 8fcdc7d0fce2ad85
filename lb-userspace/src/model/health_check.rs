//! What a VIP asks of its backends' health (`Vip::health_check`), as every source writes it
//! (the static config's `health_check:`, a Service's `sluice.io/health-check` annotation), and
//! the one duration grammar of sluice's text inputs (config, annotations, command line).
//! Checking is `health`'s job; this is the vocabulary.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

/// How a backend is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckProtocol {
    /// A TCP connection is accepted.
    Tcp,
    /// An HTTP/1.0 GET answers 2xx or 3xx.
    Http,
}

/// One health check: `{protocol, port, path, interval, timeout, fall, rise}`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct HealthCheck {
    pub protocol: CheckProtocol,
    pub port: u16,
    /// HTTP only. Shared: every VIP of a Service (and every model pass) has a copy.
    #[serde(serialize_with = "as_str")]
    pub path: Arc<str>,
    #[serde(serialize_with = "as_millis")]
    pub interval: Duration,
    #[serde(serialize_with = "as_millis")]
    pub timeout: Duration,
    /// Consecutive failures that take a backend down.
    pub fall: u32,
    /// Consecutive successes that bring it back.
    pub rise: u32,
    /// A Kubernetes convention chosen by default (kube-proxy's healthz), not asked for: while
    /// nothing has ever listened on its port (a cluster without kube-proxy) it is not held
    /// against the node.
    #[serde(skip)]
    pub implicit: bool,
}

fn as_str<S: serde::Serializer>(text: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(text)
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// kube-proxy's health endpoint (`--healthz-bind-address`, port 10256).
pub const KUBE_PROXY_HEALTHZ_PORT: u16 = 10256;

impl HealthCheck {
    /// The defaults of the issue and the README: 1 s apart, 500 ms to answer, 3 down, 2 up.
    pub fn new(protocol: CheckProtocol, port: u16, path: &str) -> Self {
        Self {
            protocol,
            port,
            path: if path.is_empty() {
                "/".into()
            } else {
                path.into()
            },
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            fall: 3,
            rise: 2,
            implicit: false,
        }
    }

    /// Checks that are wrong whatever the backend: the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.port == 0 {
            return Err("port: 0 is not a port (1-65535)".into());
        }
        if self.interval < Duration::from_millis(100) || self.interval > Duration::from_secs(300) {
            return Err(format!(
                "interval: {:?} is outside 100ms..300s",
                self.interval
            ));
        }
        if self.timeout < Duration::from_millis(10) || self.timeout > self.interval {
            return Err(format!(
                "timeout: {:?} must be at least 10ms and at most the interval ({:?})",
                self.timeout, self.interval
            ));
        }
        if !(1..=100).contains(&self.fall) || !(1..=100).contains(&self.rise) {
            return Err(format!(
                "fall {} / rise {}: each must be 1 to 100",
                self.fall, self.rise
            ));
        }
        if self.protocol == CheckProtocol::Http
            && (!self.path.starts_with('/') || self.path.bytes().any(|b| b <= b' ' || b >= 0x7f))
        {
            return Err(format!(
                "path: {:?} must start with / and hold no spaces or control characters",
                self.path
            ));
        }
        Ok(())
    }
}

impl fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.protocol {
            CheckProtocol::Tcp => write!(f, "tcp:{}", self.port),
            CheckProtocol::Http => write!(f, "http:{}{}", self.port, self.path),
        }
    }
}

/// A duration as the config and the annotation write it: `500ms`, `1s`, `1.5s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(format!("{text:?} is not a duration like 500ms or 1s"));
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms or 1s"))?;
    if !value.is_finite() || value < 0.0 || value > 86_400.0 {
        return Err(format!("{text:?} is not a duration like 500ms or 1s"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}
