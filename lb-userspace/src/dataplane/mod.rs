//! The aya side of sluice: loading and attaching the XDP programs, pinning, typed handles on
//! their maps, Maglev tables and the maps' snapshot. No other module names aya (the layers test
//! checks it): the reconcile writes and the observers read through [`Maps`]' methods, in
//! lb-common's types.

use std::path::PathBuf;

use anyhow::{Context as _, anyhow, bail};
use aya::{
    EbpfLoader,
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{
    BALANCER_PROGRAM, CONNTRACK_PROBE_PROGRAM, DECAP_PROGRAM, decap_map_names, flow_table_size_v6,
    map_names,
};

use crate::net::Interface;

/// A loaded object (its programs and the maps they share), held for as long as it is attached.
pub use aya::Ebpf;

/// The XDP objects, built by build.rs for the BPF target and embedded in the binary.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));
/// The benchmark's traffic generator and counter (`cargo xtask bench`); sluice never loads it.
#[cfg(feature = "bench")]
pub static PKTGEN_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-pktgen"));

/// Which of the two objects an attachment runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    /// The load balancer (`sluice run|attach`).
    Balancer,
    /// The backend-side decapsulator (`sluice decap`).
    Decap,
    /// The benchmark's generator (never pinned).
    #[cfg(feature = "bench")]
    Pktgen,
}

impl ObjectKind {
    fn bytes(self) -> &'static [u8] {
        match self {
            Self::Balancer => OBJECT,
            Self::Decap => DECAP_OBJECT,
            #[cfg(feature = "bench")]
            Self::Pktgen => PKTGEN_OBJECT,
        }
    }
    pub fn map_names(self) -> &'static [&'static str] {
        match self {
            Self::Balancer => &map_names::ALL,
            Self::Decap => &decap_map_names::ALL,
            #[cfg(feature = "bench")]
            Self::Pktgen => &[],
        }
    }
    fn programs(self) -> &'static [&'static str] {
        match self {
            Self::Balancer => &[BALANCER_PROGRAM, PASS_PROGRAM, CONNTRACK_PROBE_PROGRAM],
            Self::Decap => &[DECAP_PROGRAM],
            // The bench loads (and verifies) the one it uses.
            #[cfg(feature = "bench")]
            Self::Pktgen => &[],
        }
    }
}

/// Where sluice pins its state unless told otherwise.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/sluice";
/// The program that only passes packets (labs attach it on the peer of a veth).
pub const PASS_PROGRAM: &str = "sluice_pass";

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Takes map `$name` with `$take` and converts it to its typed handle.
macro_rules! typed {
    ($take:ident, $name:expr) => {
        $take($name)?
            .try_into()
            .map_err(|e| anyhow!("map {} has an unexpected layout: {e}", $name))?
    };
}

mod conntrack_probe;
mod maglev_table;
mod maps;
mod pins;
mod resize;
mod snapshot;
mod sys;
mod trace;
mod writes;

pub use conntrack_probe::conntrack_tracks;
pub use maglev_table::{TableWrite, free_maglev_tables, install_maglev_tables};
pub use maps::{AnnounceMap, DecapMaps, DecapSets, Maps, announce_key, scoped_prefix};
pub use pins::PinLayout;
pub use snapshot::{Member, RangeKey, Snapshot, fnv1a, members_by_table, table_picks};
pub use trace::{TRACE_LEASE, TraceMaps, TraceSession, monotonic_ns};

/// Loads the balancer (maps created, or reused from `pins` after a layout check; programs
/// verified, not attached), with connection tables of `flow_table_size` entries (IPv4; IPv6's
/// from it): pinned ones of another size are replaced, their entries carried over (`resize`).
pub fn load(pins: Option<&PinLayout>, flow_table_size: u32) -> anyhow::Result<Ebpf> {
    let sizes = [
        (map_names::FLOWS, flow_table_size),
        (map_names::FLOWS6, flow_table_size_v6(flow_table_size)),
    ];
    let set_aside = match pins {
        Some(pins) => {
            pins.check_layout()?;
            resize::set_aside(pins, sizes)?
        }
        None => Vec::new(),
    };
    let loaded = load_object(ObjectKind::Balancer, pins, |loader| {
        for (name, entries) in sizes {
            loader.map_max_entries(name, entries);
        }
    });
    let mut ebpf = match loaded {
        Ok(ebpf) => ebpf,
        Err(e) => {
            resize::restore(&set_aside);
            return Err(e);
        }
    };
    resize::carry_over(&mut ebpf, set_aside)?;
    if let Some(pins) = pins {
        pins.mark_layout()?;
    }
    Ok(ebpf)
}

/// Attaches `program` and pins its link at `pins.link()`; if a link is pinned there already
/// (a `sluice attach`, or a `sluice run` that was killed), replaces the program inside it
/// atomically instead (BPF_LINK_UPDATE: each packet meets the old program or the new one, and
/// the maps they share keep their flows). Returns whether it replaced.
pub fn attach_pinned(
    ebpf: &mut Ebpf,
    program: &str,
    iface: &Interface,
    generic: bool,
    pins: &PinLayout,
) -> anyhow::Result<bool> {
    if !pins.has_link() {
        let link = attach(ebpf, program, iface, generic)?;
        link.pin(pins.link())
            .map_err(|e| anyhow!("pinning the XDP link at {}: {e}", pins.link().display()))?;
        return Ok(false);
    }
    let pinned = PinnedLink::from_pin(pins.link())
        .map_err(|e| anyhow!("opening the pinned link {}: {e}", pins.link().display()))?;
    let link = XdpLink::try_from(FdLink::from(pinned))
        .map_err(|e| anyhow!("{} is not an XDP link: {e}", pins.link().display()))?;
    let prog = xdp_program(ebpf, program)?;
    // The link keeps its pin; the program now holds one more reference to it.
    prog.attach_to_link(link)
        .map_err(|e| anyhow!("replacing the program attached to {}: {e}", iface.name))?;
    Ok(true)
}

/// Loads the benchmark's generator object (programs left unverified).
#[cfg(feature = "bench")]
pub fn load_pktgen() -> anyhow::Result<Ebpf> {
    load_object(ObjectKind::Pktgen, None, |_| {})
}

/// Loads the decapsulator, the same way.
pub fn load_decap(pins: Option<&PinLayout>) -> anyhow::Result<Ebpf> {
    load_object(ObjectKind::Decap, pins, |_| {})
}

fn load_object(
    kind: ObjectKind,
    pins: Option<&PinLayout>,
    configure: impl FnOnce(&mut EbpfLoader),
) -> anyhow::Result<Ebpf> {
    let load_dir = pins.map(PinLayout::load_dir).transpose()?;
    let paths: Vec<(&str, PathBuf)> = match &load_dir {
        Some(dir) => kind.map_names().iter().map(|n| (*n, dir.join(n))).collect(),
        None => Vec::new(),
    };
    let mut loader = EbpfLoader::new();
    configure(&mut loader);
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(kind.bytes()).map_err(|e| {
        if e.to_string().contains("Operation not permitted") {
            anyhow!("loading the XDP program: permission denied: sluice needs root (CAP_BPF, CAP_NET_ADMIN); run it with sudo")
        } else {
            anyhow!("loading the XDP program: {e}")
        }
    })?;
    for name in kind.programs() {
        xdp_program(&mut ebpf, name)?
            .load()
            .map_err(|e| anyhow!("verifying {name}: {}", program_error(&e)))?;
    }
    if let (Some(pins), Some(dir)) = (pins, &load_dir) {
        pins.publish(dir)?;
    }
    Ok(ebpf)
}

pub fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?
        .try_into()
        .map_err(|e| anyhow!("program {name} is not XDP: {e}"))
}

fn program_error(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            format!("{io_error}\n{verifier_log}")
        }
        other => other.to_string(),
    }
}

/// Attaches `program` to `iface` and returns the link (detached when dropped unless pinned).
pub fn attach(
    ebpf: &mut Ebpf,
    program: &str,
    iface: &Interface,
    generic: bool,
) -> anyhow::Result<FdLink> {
    let prog = xdp_program(ebpf, program)?;
    let mode = if generic {
        XdpMode::Skb
    } else {
        XdpMode::Driver
    };
    let id = prog.attach(iface.index, mode).map_err(|e| {
        let detail = e.to_string();
        if detail.contains("Device or resource busy") || detail.contains("EBUSY") {
            anyhow!(
                "interface {} already has an XDP program (see `ip link show {}`): detach it first (`sluice detach --iface {}` if it is sluice's)",
                iface.name, iface.name, iface.name
            )
        } else if !generic && (detail.contains("not supported") || detail.contains("Invalid argument")) {
            anyhow!(
                "native XDP is not available on {}: {detail}; rerun with --generic to use the slower generic (skb) mode",
                iface.name
            )
        } else {
            anyhow!("attaching XDP to {}: {detail}", iface.name)
        }
    })?;
    let link = prog
        .take_link(id)
        .map_err(|e| anyhow!("taking the XDP link of {}: {e}", iface.name))?;
    FdLink::try_from(link).map_err(|e| {
        anyhow!(
            "the kernel attached {} without a BPF link ({e}); sluice needs kernel >= 5.9",
            iface.name
        )
    })
}

/// Detaches a pinned attachment and removes its pins.
pub fn detach_pinned(pins: &PinLayout) -> anyhow::Result<()> {
    if !pins.has_link() && !pins.has_maps() {
        bail!(
            "nothing attached: no sluice state in {} (see `ls {}`)",
            pins.dir().display(),
            pins.dir().parent().unwrap_or(pins.dir()).display()
        );
    }
    if pins.has_link() {
        let link = PinnedLink::from_pin(pins.link())
            .map_err(|e| anyhow!("opening the pinned link {}: {e}", pins.link().display()))?;
        // Unpinning drops the last reference: the kernel detaches the program.
        drop(link.unpin().context("unpinning the XDP link")?);
    }
    pins.remove()
}
