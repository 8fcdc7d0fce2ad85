//! sluice's one small HTTP server (hyper, HTTP/1 only, on a small tokio runtime of its own):
//! `/metrics` for `sluice run` and `sluice agent`, `/healthz` and `/readyz` for the agent's
//! probes. Each listener serves a fixed set of paths; anything else is a 404 naming them. And its
//! one small client: [`fetch`] (`sluice inspect` asking the agent) and [`status_code`] (the
//! health probes).
//!
//! The server trusts no client ([`Limits`]): a request head must arrive whole within a deadline
//! and fit a size, and the connections held are capped. At the cap, a new connection takes the
//! place of the oldest one that is not being answered (idle between requests, or still sending
//! its head: closing it loses no request, as nginx reuses its keep-alive connections), so idle
//! or slow clients can never lock the probes out; only when every held connection is being
//! answered is the new one closed at once. Handlers run on a blocking pool, so a slow scrape
//! never stalls the accept loop.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context as TaskContext, Poll},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use hyper::{
    Request, Response,
    body::{Body, Frame, Incoming, SizeHint},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use tokio::sync::{Notify, oneshot};

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

/// What a path answers, computed on each request (on a blocking thread: it may read maps).
pub type Handler = Box<dyn Fn() -> Reply + Send + Sync>;

/// What the server grants a client.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A request head must arrive whole within this, counted from the connection's start or
    /// from the end of the previous answer (so it also bounds idle keep-alive connections).
    pub header_timeout: Duration,
    /// The request head's size (request line and headers), bytes; larger: 431 and closed.
    pub max_head: usize,
    /// Headers in a request head; more: 431 and closed.
    pub max_headers: usize,
    /// Connections held at once (see the module's header for what happens at the cap).
    pub max_connections: usize,
    /// A connection answering for longer than this (a handler stuck, or a client that does not
    /// read its answer) may be closed to make room for a new one.
    pub answer_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_head: 8 << 10,
            max_headers: 32,
            max_connections: 256,
            answer_timeout: Duration::from_secs(30),
        }
    }
}

/// Handlers run at once at most (the rest wait their turn).
const HANDLER_THREADS: usize = 4;
/// The smallest read buffer hyper allows; enough for a head of [`Limits::max_head`] ≤ 8 KiB.
const MIN_READ_BUFFER: usize = 8192;
/// After an accept error (out of file descriptors...): wait before the next accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Connections closed or refused for the cap are logged at most this often.
const CAP_LOG_EVERY: Duration = Duration::from_secs(60);

/// A running listener; stops when dropped (its connections are closed).
pub struct Server {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Listens on `addr` (binding here, so a taken address fails at once; `flag` names the option
/// that chose it) and answers `GET` on `routes` from a thread named `name`, with the default
/// [`Limits`].
pub fn serve(
    addr: SocketAddr,
    name: &str,
    flag: &str,
    routes: Vec<(&'static str, Handler)>,
) -> anyhow::Result<Server> {
    serve_with(addr, name, flag, routes, Limits::default())
}

/// [`serve`] with other [`Limits`].
pub fn serve_with(
    addr: SocketAddr,
    name: &str,
    flag: &str,
    routes: Vec<(&'static str, Handler)>,
    limits: Limits,
) -> anyhow::Result<Server> {
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e} (choose another {flag})"))?;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("{addr}: setting the listener non-blocking"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(HANDLER_THREADS)
        .thread_name(format!("{name}-handler"))
        .build()
        .with_context(|| format!("starting the {name} server's runtime"))?;
    let paths = routes
        .iter()
        .map(|(p, _)| *p)
        .collect::<Vec<_>>()
        .join(", ");
    let routes = Arc::new(Routes { routes, paths });
    let (stop, stopped) = oneshot::channel();
    let thread = thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => {
                        tokio::select! {
                            () = accept_loop(listener, routes, limits) => {}
                            _ = stopped => {}
                        }
                    }
                    Err(e) => warn!("{addr}: the listener cannot join its runtime: {e}"),
                }
            });
            // Handlers still running finish on their own; the connections are closed.
            runtime.shutdown_timeout(Duration::from_secs(1));
        })
        .with_context(|| format!("starting the {name} thread"))?;
    Ok(Server {
        stop: Some(stop),
        thread: Some(thread),
    })
}

struct Routes {
    routes: Vec<(&'static str, Handler)>,
    paths: String,
}

impl Routes {
    fn answer(&self, path: &str) -> Reply {
        match self.routes.iter().find(|(p, _)| *p == path) {
            Some((_, handler)) => handler(),
            None => Reply::text(
                404,
                format!("not found; this server answers {}\n", self.paths),
            ),
        }
    }
}

/// One held connection, as the cap sees it.
struct Held {
    /// Closes it (the connection's task drops the socket).
    close: Arc<Notify>,
    /// Since when it is being answered: milliseconds after the server's start, plus one; 0
    /// while it waits for (or reads) a request head.
    answering: Arc<AtomicU64>,
}

/// The connections held, oldest first.
#[derive(Default)]
struct Table {
    held: BTreeMap<u64, Held>,
    next_id: u64,
    /// Closed or refused for the cap since the last log line, and when that was.
    evicted: u64,
    refused: u64,
    logged: Option<Instant>,
}

impl Table {
    /// Makes room for one more connection: true if there is (perhaps by closing the oldest
    /// connection not being answered, or one answering for too long).
    fn make_room(&mut self, limits: &Limits, epoch: Instant) -> bool {
        if self.held.len() < limits.max_connections {
            return true;
        }
        let now = millis_since(epoch);
        let too_long = limits.answer_timeout.as_millis() as u64;
        let victim = self.held.iter().find_map(|(id, h)| {
            let since = h.answering.load(Ordering::Relaxed);
            (since == 0 || now.saturating_sub(since - 1) > too_long).then_some(*id)
        });
        let room = match victim.and_then(|id| self.held.remove(&id)) {
            Some(held) => {
                held.close.notify_one();
                self.evicted += 1;
                true
            }
            None => {
                self.refused += 1;
                false
            }
        };
        if self.logged.is_none_or(|t| t.elapsed() >= CAP_LOG_EVERY) {
            warn!(
                "HTTP: {} connections held (the cap): {} closed to make room for new ones, {} refused (all busy) since the last report",
                limits.max_connections, self.evicted, self.refused
            );
            (self.evicted, self.refused, self.logged) = (0, 0, Some(Instant::now()));
        }
        room
    }
}

fn millis_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64 + 1
}

async fn accept_loop(listener: tokio::net::TcpListener, routes: Arc<Routes>, limits: Limits) {
    let epoch = Instant::now();
    let table = Arc::new(Mutex::new(Table::default()));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MIN_READ_BUFFER.max(limits.max_head))
        .max_header_size(limits.max_head)
        .max_headers(limits.max_headers)
        .half_close(false);
    let builder = Arc::new(builder);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!("HTTP: accepting a connection: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let close = Arc::new(Notify::new());
        let answering = Arc::new(AtomicU64::new(0));
        let id = {
            let Ok(mut t) = table.lock() else {
                return;
            };
            if !t.make_room(&limits, epoch) {
                debug!("HTTP: {peer}: refused, every held connection is being answered");
                continue;
            }
            let id = t.next_id;
            t.next_id += 1;
            t.held.insert(
                id,
                Held {
                    close: close.clone(),
                    answering: answering.clone(),
                },
            );
            id
        };
        let (routes, table, builder) = (routes.clone(), table.clone(), builder.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let routes = routes.clone();
                let guard = Answering::start(answering.clone(), epoch);
                async move {
                    let path = request.uri().path().to_owned();
                    let reply = tokio::task::spawn_blocking(move || routes.answer(&path))
                        .await
                        .unwrap_or_else(|e| {
                            warn!("HTTP: a handler failed: {e}");
                            Reply::text(500, "the handler failed\n")
                        });
                    Ok::<_, Infallible>(response(reply, guard))
                }
            });
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                r = connection => {
                    if let Err(e) = r {
                        debug!("HTTP: {peer}: {e}");
                    }
                }
                () = close.notified() => debug!("HTTP: {peer}: closed to make room"),
            }
            if let Ok(mut t) = table.lock() {
                t.held.remove(&id);
            }
        });
    }
}

fn response(reply: Reply, guard: Answering) -> Response<Answer> {
    let mut response = Response::new(Answer {
        data: Some(Bytes::from(reply.body)),
        _answering: guard,
    });
    *response.status_mut() = hyper::StatusCode::from_u16(reply.status)
        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(reply.content_type));
    response
}

/// Marks a connection as being answered until dropped (with the answer's body, once hyper has
/// taken it, or with the request if the client goes first).
struct Answering(Arc<AtomicU64>);

impl Answering {
    fn start(answering: Arc<AtomicU64>, epoch: Instant) -> Self {
        answering.store(millis_since(epoch), Ordering::Relaxed);
        Self(answering)
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// An answer's body: one chunk of known length.
struct Answer {
    data: Option<Bytes>,
    _answering: Answering,
}

impl Body for Answer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().data.take().map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
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
