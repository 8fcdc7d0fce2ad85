//! sluice's one small HTTP server (tiny_http on a thread of its own): `/metrics` for `sluice
//! run` and `sluice agent`, `/healthz` and `/readyz` for the agent's probes. Each listener
//! serves a fixed set of paths; anything else is a 404 naming them. And its one small client:
//! [`fetch`] (`sluice inspect` asking the agent) and [`status_code`] (the health probes).

use std::{
    net::SocketAddr,
    sync::Arc,
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use log::warn;

/// One answer.
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// What a path answers, computed on each request.
pub type Handler = Box<dyn Fn() -> Reply + Send + Sync>;

/// A running listener; stops when dropped.
pub struct Server {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Listens on `addr` (binding here, so a taken address fails at once; `flag` names the option
/// that chose it) and answers `GET` on `routes` from a thread named `name`.
pub fn serve(
    addr: SocketAddr,
    name: &str,
    flag: &str,
    routes: Vec<(&'static str, Handler)>,
) -> anyhow::Result<Server> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| anyhow!("cannot listen on {addr}: {e} (choose another {flag})"))?;
    let server = Arc::new(server);
    let paths = routes
        .iter()
        .map(|(p, _)| *p)
        .collect::<Vec<_>>()
        .join(", ");
    let thread = {
        let server = Arc::clone(&server);
        thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for request in server.incoming_requests() {
                    let reply = match routes.iter().find(|(p, _)| *p == request.url()) {
                        Some((_, handler)) => handler(),
                        None => {
                            Reply::text(404, format!("not found; this server answers {paths}\n"))
                        }
                    };
                    let response =
                        tiny_http::Response::from_string(reply.body).with_status_code(reply.status);
                    let response = match tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        reply.content_type.as_bytes(),
                    ) {
                        Ok(header) => response.with_header(header),
                        Err(()) => response,
                    };
                    if let Err(e) = request.respond(response) {
                        warn!("answering an HTTP request: {e}");
                    }
                }
            })
            .with_context(|| format!("starting the {name} thread"))?
    };
    Ok(Server {
        server,
        thread: Some(thread),
    })
}

/// Where `/metrics`'s server answers with the health overlay's rows (JSON), for `inspect backends`.
pub const HEALTH_BACKENDS_PATH: &str = "/health/backends";

/// A blocking `GET http://addr/path` with a timeout, for `sluice inspect` (the agent's own
/// endpoints): the body when the status is 200.
pub fn fetch(addr: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.take(16 << 20).read_to_end(&mut answer)?;
    let status = status_code(&answer)
        .ok_or_else(|| anyhow::anyhow!("http://{addr}{path}: not an HTTP answer"))?;
    anyhow::ensure!(status == 200, "http://{addr}{path}: status {status}");
    let body = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(&answer[..0], |i| &answer[i + 4..]);
    Ok(String::from_utf8_lossy(body).into_owned())
}

/// The status of `HTTP/1.x NNN ...`.
pub fn status_code(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts
        .next()?
        .parse()
        .ok()
        .filter(|s| (100..600).contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 503 x\r\n"), Some(503));
        assert_eq!(status_code(b"SSH-2.0\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 abc\r\n"), None);
    }
}
