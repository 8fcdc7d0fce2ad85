//! `/metrics` beside a full connection table (root: BPF maps pinned on /sys/fs/bpf): the scrape
//! no longer walks the table, so it answers in bounded time; the count arrives within a few
//! seconds and is exact. Prints the walk that each scrape used to pay, and the scrape times.

use std::time::{Duration, Instant};

use lb_common::{FlowKey4, FlowValue};
use lb_userspace::{
    dataplane::{self, Maps, PinLayout},
    http,
    observe::metrics::{self, Instruments},
};

/// Entries put in the IPv4 connection table.
const ENTRIES: u32 = 1 << 20;
/// Its size: an LRU with a free list per CPU, so one thread's inserts keep at most SIZE / CPUs
/// of them (all of them on 2 CPUs; the test counts what it kept).
const SIZE: u32 = 2 * ENTRIES;

fn sample(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn a_scrape_beside_a_million_flows_answers_in_bounded_time() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root (BPF maps)");
        return;
    }
    let root = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/sluice-test-scrape-{}",
        std::process::id()
    ));
    let pins = PinLayout::new(&root, "scrape0");
    pins.prepare().expect("a bpffs at /sys/fs/bpf");
    let result = std::panic::catch_unwind(|| scrape_beside_full_table(&pins));
    let _ = pins.remove();
    let _ = std::fs::remove_dir(&root);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn scrape_beside_full_table(pins: &PinLayout) {
    let ebpf = dataplane::load(Some(pins), SIZE).expect("load and pin the maps");
    let mut maps = Maps::from_pins(pins).expect("open the pinned maps");
    let t = Instant::now();
    for i in 0..ENTRIES {
        let key = FlowKey4 {
            src: 0x0a00_0000 | i,
            dst: 0xc0a8_0001,
            sport: (i % 50_000) as u16 + 1024,
            dport: 80,
            proto: 6,
            _pad: [0; 3],
        };
        maps.insert_flow(
            &key.widen(),
            &FlowValue {
                backend: 1,
                vip: 0,
                generation: 1,
            },
        )
        .expect("insert a flow");
    }
    println!("{ENTRIES} flows inserted in {:?}", t.elapsed());
    let t = Instant::now();
    let (walked, _) = maps.count_flows(usize::MAX);
    let walk = t.elapsed();
    println!("walking the table (what each scrape did before): {walked} entries in {walk:?}");
    drop(maps);

    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let _server = metrics::serve(addr, pins, Instruments::default(), Vec::new()).expect("serve");
    let started = Instant::now();
    let mut times = Vec::new();
    let mut counted = None;
    while started.elapsed() < Duration::from_secs(30) {
        let t = Instant::now();
        let text = http::fetch(addr, "/metrics", Duration::from_secs(10)).expect("/metrics");
        times.push(t.elapsed());
        if let Some(v4) = sample(&text, "sluice_flows{family=\"ipv4\"}") {
            counted = Some((v4, started.elapsed()));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let worst = times.iter().max().copied().unwrap_or_default();
    println!(
        "{} scrapes while the first count ran: worst {worst:?} (the walk alone: {walk:?})",
        times.len()
    );
    let (v4, after) = counted.expect("sluice_flows never appeared (30 s)");
    println!("sluice_flows{{family=\"ipv4\"}} {v4} after {after:?}");
    assert_eq!(
        v4 as usize, walked,
        "/metrics against the table walked here"
    );
    assert!(
        walked >= 250_000,
        "only {walked} entries kept: not a large table"
    );
    // Bounded: the scrape's own wait for a count plus reading the small maps, far below a walk.
    assert!(
        worst < metrics::FLOW_COUNT_WAIT + Duration::from_millis(400),
        "a scrape took {worst:?} beside {ENTRIES} flows"
    );

    // Scraped back to back: the next walk waits its turn, scrapes stay quick, the count stays.
    let mut times = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let text = http::fetch(addr, "/metrics", Duration::from_secs(10)).expect("/metrics");
        times.push(t.elapsed());
        assert_eq!(
            sample(&text, "sluice_flows{family=\"ipv4\"}"),
            Some(walked as f64)
        );
    }
    let worst = times.iter().max().copied().unwrap_or_default();
    println!("10 scrapes back to back with the count cached: worst {worst:?}");
    assert!(worst < metrics::FLOW_COUNT_WAIT + Duration::from_millis(400));
    drop(ebpf);
}
