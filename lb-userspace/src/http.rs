//! sluice's one small HTTP server (tiny_http on a thread of its own): `/metrics` for `sluice
//! run` and `sluice agent`, `/healthz` and `/readyz` for the agent's probes. Each listener
//! serves a fixed set of paths; anything else is a 404 naming them.

use std::{
    net::SocketAddr,
    sync::Arc,
    thread::{self, JoinHandle},
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
