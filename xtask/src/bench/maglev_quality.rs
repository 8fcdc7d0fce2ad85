//! Maglev quality of `lb_userspace::maglev::build_table`, at the size a VIP of N backends gets
//! by default (its tier, `lb_common::maglev_tier`) and at the largest (65537): how evenly the
//! slots (and so the flows, which hash uniformly onto slots) spread over N backends, and which
//! share of them moves when one backend leaves, against the ideal 1/N (its own slots).

use std::net::Ipv4Addr;

use lb_common::{DEFAULT_MAGLEV_SIZE, maglev_tier};
use lb_userspace::maglev::{MaglevBackend, build_table};

#[derive(Debug, Clone)]
pub struct MaglevRow {
    pub backends: usize,
    pub table_size: u32,
    /// Slots of the fullest backend / the mean.
    pub max_over_mean: f64,
    /// Share of slots whose backend changed when one backend left.
    pub remapped: f64,
    /// 1/N: the leaver's own share, the least any scheme must move.
    pub ideal: f64,
}

pub fn run() -> Vec<MaglevRow> {
    [3usize, 10, 100]
        .into_iter()
        .flat_map(|n| [quality(n, maglev_tier(n)), quality(n, DEFAULT_MAGLEV_SIZE)])
        .collect()
}

fn quality(n: usize, size: u32) -> MaglevRow {
    // Ids as the dataplane uses them: backend addresses.
    let all: Vec<MaglevBackend> = (0..n)
        .map(|i| MaglevBackend {
            id: u32::from(Ipv4Addr::new(10, 1, (i / 200) as u8, 10 + (i % 200) as u8)),
            weight: 1,
        })
        .collect();
    let before = build_table(&all, size);
    let mut counts = vec![0u64; n];
    for &slot in &before {
        counts[slot as usize] += 1;
    }
    let mean = f64::from(size) / n as f64;
    let max = counts.iter().copied().max().unwrap_or(0) as f64;

    // The middle backend leaves; compare owners by id, since indices shift.
    let leaver = n / 2;
    let rest: Vec<MaglevBackend> = all
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != leaver)
        .map(|(_, b)| *b)
        .collect();
    let after = build_table(&rest, size);
    let moved = before
        .iter()
        .zip(&after)
        .filter(|&(&b, &a)| all[b as usize].id != rest[a as usize].id)
        .count();
    MaglevRow {
        backends: n,
        table_size: size,
        max_over_mean: max / mean,
        remapped: moved as f64 / f64::from(size),
        ideal: 1.0 / n as f64,
    }
}

pub fn print(rows: &[MaglevRow]) {
    println!(
        "{:>4} {:>8} {:>9} {:>14} {:>8}",
        "N", "slots", "max/mean", "remapped", "1/N"
    );
    for r in rows {
        println!(
            "{:>4} {:>8} {:>9.4} {:>13.2}% {:>7.2}%",
            r.backends,
            r.table_size,
            r.max_over_mean,
            r.remapped * 100.0,
            r.ideal * 100.0
        );
    }
}
