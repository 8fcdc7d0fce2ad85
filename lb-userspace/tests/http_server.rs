//! The HTTP server against hostile clients, on real loopback sockets (no root): idle connections
//! and slow-header clients neither lock the probes out nor stay, oversized heads are refused,
//! the connection cap closes idle connections first and refuses only when all are busy, and the
//! routes answer what they always answered.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use lb_userspace::http::{self, Handler, Limits, Reply};

/// A free loopback port (bound then released: the server binds it next).
fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("its address")
}

fn healthz() -> Vec<(&'static str, Handler)> {
    vec![
        ("/healthz", Box::new(|| Reply::text(200, "ok\n")) as Handler),
        (
            "/readyz",
            Box::new(|| Reply::text(503, "not synced\n")) as Handler,
        ),
    ]
}

/// True once the server closed `s` (EOF or reset), reading whatever it sent before; waits at
/// most `wait`.
fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if Instant::now() >= deadline {
                    return false;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // Reset: closed.
            Err(_) => return true,
        }
    }
}

/// One raw exchange: sends `request`, reads the answer until the server closes (at most 5 s).
fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The server may close before taking it all (a head too large): keep what it answered.
    let _ = s.write_all(request);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

const IDLE: usize = 1000;
const SLOW: usize = 20;
const PROBES: usize = 20;

#[test]
fn idle_and_slow_clients_neither_lock_out_the_probes_nor_stay() {
    let addr = free_addr();
    let limits = Limits {
        header_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let _server =
        http::serve_with(addr, "test-http", "--health-addr", healthz(), limits).expect("serve");

    let opened = Instant::now();
    // Each with the time it was accepted (this host's loopback drops bursts of SYNs: opening
    // them all takes seconds, so each is judged from its own start).
    let mut idle: Vec<(TcpStream, Instant)> = (0..IDLE)
        .map(|i| {
            let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("idle connection {i}: {e}"));
            (s, Instant::now())
        })
        .collect();
    // Slow-header clients: a byte of a request head every second, until the server closes.
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: slow\r\nAccept: */*\r\n\r\n";
    let slow_closed = Arc::new(AtomicUsize::new(0));
    let slow: Vec<_> = (0..SLOW)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("slow connection");
            let slow_closed = slow_closed.clone();
            thread::spawn(move || {
                let started = Instant::now();
                for byte in head.iter().cycle() {
                    if s.write_all(&[*byte]).is_err()
                        || closed_within(&mut s, Duration::from_secs(1))
                    {
                        slow_closed.fetch_add(1, Ordering::Relaxed);
                        return Some(started.elapsed());
                    }
                    if started.elapsed() > Duration::from_secs(20) {
                        return None;
                    }
                }
                None
            })
        })
        .collect();
    println!(
        "{IDLE} idle and {SLOW} slow-header connections opened in {:?}",
        opened.elapsed()
    );
    thread::sleep(Duration::from_millis(300));

    // The probes, each on a connection of its own, as the kubelet does.
    let mut took = Vec::new();
    for _ in 0..PROBES {
        let t = Instant::now();
        let body = http::fetch(addr, "/healthz", Duration::from_secs(5)).expect("/healthz");
        took.push(t.elapsed());
        assert_eq!(body, "ok\n");
    }
    took.sort();
    let (median, worst) = (took[PROBES / 2], took[PROBES - 1]);
    println!(
        "/healthz beside {IDLE} idle and {SLOW} slow-header connections: median {median:?}, worst {worst:?} ({PROBES} probes)"
    );
    assert!(
        worst < Duration::from_millis(100),
        "/healthz took {worst:?} (median {median:?}) beside idle and slow clients"
    );

    // Every idle connection is closed by the server: at once (the cap) or at its head deadline.
    let deadline = limits.header_timeout + Duration::from_secs(2);
    let mut open = 0;
    for (s, at) in &mut idle {
        let left = deadline.saturating_sub(at.elapsed());
        if !closed_within(s, left) {
            open += 1;
        }
    }
    println!(
        "idle connections the server still held {deadline:?} after each opened: {open} of {IDLE}"
    );
    assert_eq!(
        open, 0,
        "{open} of {IDLE} idle connections still open {deadline:?} after they opened (header timeout {:?})",
        limits.header_timeout
    );
    let mut slowest = Duration::ZERO;
    for t in slow {
        let closed_after = t.join().expect("a slow client");
        let closed_after = closed_after.expect("a slow-header client was never closed (20 s)");
        slowest = slowest.max(closed_after);
    }
    println!("{SLOW} slow-header clients (a byte a second): the last closed after {slowest:?}");
    assert!(
        slowest <= deadline,
        "a slow-header client held its connection {slowest:?}"
    );
    assert_eq!(slow_closed.load(Ordering::Relaxed), SLOW);
}

#[test]
fn oversized_heads_are_refused_and_the_server_goes_on() {
    let addr = free_addr();
    let _server = http::serve(addr, "test-http", "--health-addr", healthz()).expect("serve");
    let long_line = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: {}\r\n\r\n",
        "a".repeat(64 << 10)
    );
    let t = Instant::now();
    let answer = exchange(addr, long_line.as_bytes());
    println!(
        "a 64 KiB header line: {:?} in {:?}",
        answer.lines().next(),
        t.elapsed()
    );
    assert!(answer.starts_with("HTTP/1.1 431"), "answer: {answer:.80}");

    let many: String = (0..200).map(|i| format!("X-{i}: v\r\n")).collect();
    let answer = exchange(
        addr,
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
    );
    println!("200 headers: {:?}", answer.lines().next());
    assert!(answer.starts_with("HTTP/1.1 431"), "answer: {answer:.80}");

    assert_eq!(
        http::fetch(addr, "/healthz", Duration::from_secs(2)).expect("/healthz"),
        "ok\n"
    );
}

#[test]
fn at_the_cap_busy_connections_stay_and_new_ones_are_refused() {
    let addr = free_addr();
    let cap = 3;
    let slow: Handler = Box::new(|| {
        thread::sleep(Duration::from_millis(1500));
        Reply::text(200, "slow\n")
    });
    let routes = vec![("/slow", slow), ("/healthz", healthz().remove(0).1)];
    let limits = Limits {
        max_connections: cap,
        ..Limits::default()
    };
    let _server =
        http::serve_with(addr, "test-http", "--metrics-addr", routes, limits).expect("serve");

    // `cap` connections being answered: none may be closed for a newcomer.
    let busy: Vec<_> = (0..cap)
        .map(|_| {
            thread::spawn(move || {
                exchange(
                    addr,
                    b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                )
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    let mut refused = TcpStream::connect(addr).expect("connect");
    assert!(
        closed_within(&mut refused, Duration::from_millis(500)),
        "a connection over the cap, all held ones busy, was not closed at once"
    );
    for b in busy {
        let answer = b.join().expect("a busy client");
        assert!(answer.starts_with("HTTP/1.1 200"), "answer: {answer:.80}");
        assert!(answer.ends_with("\r\n\r\nslow\n"), "answer: {answer:.80}");
    }
    // Room again; and idle connections make room for probes.
    let idle: Vec<_> = (0..cap)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    thread::sleep(Duration::from_millis(100));
    assert_eq!(
        http::fetch(addr, "/healthz", Duration::from_secs(2)).expect("/healthz beside idle ones"),
        "ok\n"
    );
    drop(idle);
}

#[test]
fn routes_answer_as_before() {
    let addr = free_addr();
    let _server = http::serve(addr, "test-http", "--health-addr", healthz()).expect("serve");
    let answer = exchange(addr, b"GET /healthz HTTP/1.0\r\n\r\n");
    assert!(
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("content-type: text/plain; charset=utf-8\r\n"),
        "{answer}"
    );
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("content-length: 3\r\n"),
        "{answer}"
    );
    assert!(answer.ends_with("\r\n\r\nok\n"), "{answer}");

    let answer = exchange(
        addr,
        b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nnot synced\n"), "{answer}");

    let answer = exchange(
        addr,
        b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\nnot found; this server answers /healthz, /readyz\n"),
        "{answer}"
    );

    // Two requests on one kept-alive connection.
    let answer = exchange(
        addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");

    // A taken address fails at once, naming the flag.
    let err = http::serve(addr, "test-http", "--health-addr", healthz())
        .err()
        .expect("a second listener on a taken address");
    let err = format!("{err:#}");
    assert!(err.contains("choose another --health-addr"), "{err}");
}
