//! The only module that touches aya: loading and attaching the XDP program, pinning, and typed
//! handles on its maps.

use std::{
    fs,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    ptr,
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, ArrayOfMaps, DevMapHash, HashMap, LpmTrie, Map, MapData, PerCpuArray,
        lpm_trie::Key as LpmKey,
    },
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{
    Announce, BALANCER_PROGRAM, Backend, Counters, DECAP_PROGRAM, FlowKey, FlowKey4, FlowValue,
    MAGLEV_INNER_FLAGS, PeerFilter, PeerKey, ScopedAddr, VipFilter, VipInfo, VipKey,
    decap_map_names, flow_table_size_v6, map_names,
};

use crate::net::Interface;

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
            Self::Balancer => &[BALANCER_PROGRAM, PASS_PROGRAM],
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

/// The bpffs layout of one attachment: `<root>/<iface>/{link, maps/<NAME>}` for the balancer,
/// `<root>/decap/<iface>/...` for the decapsulator.
#[derive(Clone, Debug)]
pub struct PinLayout {
    dir: PathBuf,
    kind: ObjectKind,
}

impl PinLayout {
    pub fn new(root: &Path, iface: &str) -> Self {
        Self {
            dir: root.join(iface),
            kind: ObjectKind::Balancer,
        }
    }
    pub fn decap(root: &Path, iface: &str) -> Self {
        Self {
            dir: root.join("decap").join(iface),
            kind: ObjectKind::Decap,
        }
    }
    pub fn kind(&self) -> ObjectKind {
        self.kind
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn maps_dir(&self) -> PathBuf {
        self.dir.join("maps")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }
    pub fn link(&self) -> PathBuf {
        self.dir.join("link")
    }
    /// True when a persistent attachment (`sluice attach`, or a `sluice run` that was killed)
    /// lives here.
    pub fn has_link(&self) -> bool {
        self.link().exists()
    }

    /// The layout mark: an empty directory named after [`lb_common::MAP_LAYOUT`] (bpffs holds
    /// no regular files), written when maps are first pinned.
    fn layout_mark(layout: u32) -> String {
        format!("layout-{layout:08x}")
    }

    /// Refuses pinned maps written by a program of another map layout (nothing is changed).
    pub fn check_layout(&self) -> anyhow::Result<()> {
        if self.kind != ObjectKind::Balancer || !self.has_maps() {
            return Ok(());
        }
        let ours = Self::layout_mark(lb_common::MAP_LAYOUT);
        if self.dir.join(&ours).is_dir() {
            return Ok(());
        }
        let theirs = fs::read_dir(&self.dir)
            .ok()
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("layout-"))
            .unwrap_or_else(|| "no layout mark".into());
        bail!(
            "the maps pinned in {} were written by a sluice with another map layout ({theirs}, this one has {ours}): adopting them would misread them; nothing was changed. Run `sluice detach --iface {}` first (established flows are then re-hashed), or use the sluice that pinned them",
            self.dir.display(),
            self.dir
                .file_name()
                .map_or_else(|| "IFACE".into(), |n| n.to_string_lossy().into_owned())
        )
    }

    fn mark_layout(&self) -> anyhow::Result<()> {
        if self.kind != ObjectKind::Balancer {
            return Ok(());
        }
        let mark = self.dir.join(Self::layout_mark(lb_common::MAP_LAYOUT));
        fs::create_dir_all(&mark).with_context(|| format!("creating {}", mark.display()))
    }
    pub fn has_maps(&self) -> bool {
        self.map(self.kind.map_names()[0]).exists()
    }

    /// Checks that the root is on a bpffs and creates the directories.
    pub fn prepare(&self) -> anyhow::Result<()> {
        // The nearest existing ancestor must be on a bpffs.
        let probe = self
            .dir
            .ancestors()
            .skip(1)
            .find(|dir| dir.exists())
            .unwrap_or(&self.dir);
        if !is_bpffs(probe) {
            bail!(
                "{} is not on a BPF filesystem: mount one with `mount -t bpf bpf /sys/fs/bpf` \
                 (or pass --pin-dir DIR on a bpffs)",
                probe.display()
            );
        }
        fs::create_dir_all(self.maps_dir())
            .with_context(|| format!("creating {}", self.maps_dir().display()))
    }

    /// Removes the map pins and the directories (the link pin must already be gone).
    pub fn remove(&self) -> anyhow::Result<()> {
        for name in self.kind.map_names() {
            let path = self.map(name);
            if path.exists() {
                fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
            }
        }
        let mark = self.dir.join(Self::layout_mark(lb_common::MAP_LAYOUT));
        for dir in [self.maps_dir(), mark, self.dir.clone()] {
            if dir.exists() {
                fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
            }
        }
        Ok(())
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Loads the balancer (maps created, or reused from `pins` after a layout check; programs
/// verified, not attached).
pub fn load(pins: Option<&PinLayout>, flow_table_size: u32) -> anyhow::Result<Ebpf> {
    if let Some(pins) = pins {
        pins.check_layout()?;
    }
    let ebpf = load_object(ObjectKind::Balancer, pins, |loader| {
        loader.map_max_entries(map_names::FLOWS, flow_table_size);
        loader.map_max_entries(map_names::FLOWS6, flow_table_size_v6(flow_table_size));
    })?;
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
    let paths: Vec<(&str, PathBuf)> = match pins {
        Some(p) => kind.map_names().iter().map(|n| (*n, p.map(n))).collect(),
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

/// Typed handles on every map, from a freshly loaded object or from pins.
pub struct Maps {
    pub vips: HashMap<MapData, VipKey, VipInfo>,
    pub maglev: ArrayOfMaps<MapData>,
    pub backends: Array<MapData, Backend>,
    pub flows: HashMap<MapData, FlowKey4, FlowValue>,
    pub flows6: HashMap<MapData, FlowKey, FlowValue>,
    pub tx_ports: DevMapHash<MapData>,
    pub vip_stats: PerCpuArray<MapData, Counters>,
    pub backend_stats: PerCpuArray<MapData, Counters>,
    pub global_stats: PerCpuArray<MapData, u64>,
    pub vip_filter: Array<MapData, VipFilter>,
    pub vip_addrs: HashMap<MapData, VipKey, u32>,
    pub source_ranges: LpmTrie<MapData, ScopedAddr, u8>,
    /// Addresses this node answers ARP for (the agent's announcer writes it; see [`AnnounceMap`]).
    pub announce: HashMap<MapData, VipKey, Announce>,
    /// MACs of the other sluice nodes (co-location: their VIP frames were balanced already).
    pub peers: HashMap<MapData, PeerKey, u8>,
    pub peer_filter: Array<MapData, PeerFilter>,
    /// The inline decapsulator's address sets.
    pub decap: DecapSets,
    /// Second descriptors of MAGLEV and BACKENDS, for batched calls (aya has no batch API).
    maglev_fd: OwnedFd,
    backends_fd: OwnedFd,
}

impl Maps {
    pub fn from_ebpf(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Self::open(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))
        })
    }

    pub fn from_pins(pins: &PinLayout) -> anyhow::Result<Self> {
        Self::open(|name| open_pinned(pins, name, "`sluice attach` or `sluice run`"))
    }

    fn open(mut take: impl FnMut(&str) -> anyhow::Result<Map>) -> anyhow::Result<Self> {
        let maglev = take(map_names::MAGLEV)?;
        let maglev_fd = match &maglev {
            Map::ArrayOfMaps(data) => data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .context("duplicating the MAGLEV map's descriptor")?,
            _ => bail!("map {} is not an array of maps", map_names::MAGLEV),
        };
        let backends = take(map_names::BACKENDS)?;
        let backends_fd = match &backends {
            Map::Array(data) => data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .context("duplicating the BACKENDS map's descriptor")?,
            _ => bail!("map {} is not an array", map_names::BACKENDS),
        };
        Ok(Self {
            maglev_fd,
            backends_fd,
            backends: backends.try_into().map_err(|e| {
                anyhow!("map {} has an unexpected layout: {e}", map_names::BACKENDS)
            })?,
            maglev: maglev
                .try_into()
                .map_err(|e| anyhow!("map {} has an unexpected layout: {e}", map_names::MAGLEV))?,
            vips: typed!(take, map_names::VIPS),
            flows: typed!(take, map_names::FLOWS),
            flows6: typed!(take, map_names::FLOWS6),
            tx_ports: typed!(take, map_names::TX_PORTS),
            vip_stats: typed!(take, map_names::VIP_STATS),
            backend_stats: typed!(take, map_names::BACKEND_STATS),
            global_stats: typed!(take, map_names::GLOBAL_STATS),
            vip_filter: typed!(take, map_names::VIP_FILTER),
            vip_addrs: typed!(take, map_names::VIP_ADDRS),
            source_ranges: typed!(take, map_names::SOURCE_RANGES),
            announce: typed!(take, map_names::ANNOUNCE),
            peers: typed!(take, map_names::PEERS),
            peer_filter: typed!(take, map_names::PEER_FILTER),
            decap: DecapSets {
                sources: typed!(take, map_names::DECAP_SOURCES),
                local: typed!(take, map_names::DECAP_LOCAL),
            },
        })
    }

    /// Every BACKENDS slot, in slot order: one batched lookup instead of one syscall per slot
    /// (16,384 of them, ~14 ms), falling back to that on kernels without batched array lookups.
    pub fn read_backends(&self) -> anyhow::Result<Vec<Backend>> {
        let n = self.backends.len() as usize;
        let mut keys = vec![0u32; n];
        let mut values = vec![Backend::default(); n];
        if let Ok(count) = lookup_batch(&self.backends_fd, &mut keys, &mut values)
            && count == n
            && keys.iter().enumerate().all(|(i, k)| *k as usize == i)
        {
            return Ok(values);
        }
        self.backends
            .iter()
            .map(|v| v.context("reading the BACKENDS map"))
            .collect()
    }

    /// The fingerprint stored beside VIP `vip_id`'s installed Maglev table of `size` slots
    /// ([`FINGERPRINT_ELEMENTS`]); `None` when the VIP has no table, one of another size, or
    /// one without a fingerprint. A lookup, a descriptor and one mapped page per VIP: cheap
    /// enough to check every VIP on every reconcile.
    pub fn maglev_fingerprint(&self, vip_id: u32, size: u32) -> Option<u64> {
        let inner: MapData = self.maglev.get(&vip_id, 0).ok()?;
        let total = size.checked_add(FINGERPRINT_ELEMENTS)?;
        if inner.info().ok()?.max_entries() != total {
            return None;
        }
        MaglevMapping::new(&inner, total, libc::PROT_READ)
            .ok()?
            .fingerprint(size)
    }

    /// Reads a VIP's Maglev table (slot -> backend id).
    pub fn maglev_table(&self, vip_id: u32, size: u32) -> anyhow::Result<Vec<u32>> {
        let inner: MapData = self
            .maglev
            .get(&vip_id, 0)
            .map_err(|e| anyhow!("reading the Maglev table of VIP #{vip_id}: {e}"))?;
        let mapping = MaglevMapping::new(&inner, size, libc::PROT_READ)?;
        Ok(mapping.read())
    }
}

/// The `ANNOUNCE` map alone, opened from its pin: the agent's announcer owns this handle, apart
/// from the reconcile thread's [`Maps`] (each entry is written by one of them only).
pub struct AnnounceMap {
    map: HashMap<MapData, VipKey, Announce>,
}

impl AnnounceMap {
    pub fn from_pins(pins: &PinLayout) -> anyhow::Result<Self> {
        let take = |name: &str| open_pinned(pins, name, "`sluice agent`");
        Ok(Self {
            map: typed!(take, map_names::ANNOUNCE),
        })
    }

    /// The addresses answered for now.
    pub fn addresses(&self) -> anyhow::Result<Vec<std::net::IpAddr>> {
        self.map
            .keys()
            .map(|k| {
                let k = k.context("reading the ANNOUNCE map")?;
                Ok(crate::reconcile::addr_from_raw(&k.addr, k.family))
            })
            .collect()
    }

    /// Answer ARP for `addr` with `mac` from now on.
    pub fn insert(&mut self, addr: std::net::IpAddr, mac: [u8; 6]) -> anyhow::Result<()> {
        let value = Announce { mac, _pad: [0; 2] };
        self.map
            .insert(&announce_key(addr), &value, 0)
            .map_err(|e| anyhow!("writing {addr} into the ANNOUNCE map: {e}"))
    }

    /// Stop answering for `addr` (absent already is fine).
    pub fn remove(&mut self, addr: std::net::IpAddr) -> anyhow::Result<()> {
        match self.map.remove(&announce_key(addr)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(anyhow!("removing {addr} from the ANNOUNCE map: {e}")),
        }
    }
}

/// The `ANNOUNCE` key of an address.
pub fn announce_key(addr: std::net::IpAddr) -> VipKey {
    let (addr, family) = crate::reconcile::raw_addr(addr);
    VipKey {
        addr,
        port: 0,
        proto: 0,
        family,
    }
    .address_only()
}

/// A map pinned by an attachment, with an error that says what to run when it is missing.
fn open_pinned(pins: &PinLayout, name: &str, attach_with: &str) -> anyhow::Result<Map> {
    if !pins.has_maps() {
        bail!(
            "no sluice maps pinned in {}: is sluice attached there? ({attach_with}, and the same --pin-dir)",
            pins.maps_dir().display()
        );
    }
    let path = pins.map(name);
    let data = MapData::from_pin(&path).map_err(|e| anyhow!("opening {}: {e}", path.display()))?;
    Map::from_map_data(data).map_err(|e| anyhow!("map {name}: {e}"))
}

/// The decapsulator's two address sets: (family, allowed outer source prefix) and (family,
/// this node's address). In the stand-alone decapsulator and in the balancer (inline decap).
pub struct DecapSets {
    pub sources: LpmTrie<MapData, ScopedAddr, u8>,
    pub local: HashMap<MapData, ScopedAddr, u8>,
}

/// The stand-alone decapsulator's maps.
pub struct DecapMaps {
    pub sets: DecapSets,
    pub stats: PerCpuArray<MapData, u64>,
}

impl DecapMaps {
    pub fn from_ebpf(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Self::open(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the decapsulator object"))
        })
    }

    pub fn from_pins(pins: &PinLayout) -> anyhow::Result<Self> {
        Self::open(|name| open_pinned(pins, name, "`sluice decap`"))
    }

    fn open(mut take: impl FnMut(&str) -> anyhow::Result<Map>) -> anyhow::Result<Self> {
        Ok(Self {
            sets: DecapSets {
                sources: typed!(take, decap_map_names::DECAP_SOURCES),
                local: typed!(take, decap_map_names::DECAP_LOCAL),
            },
            stats: typed!(take, decap_map_names::DECAP_STATS),
        })
    }
}

/// The LPM key of a prefix within a scope (VIP id, or address family).
pub fn scoped_prefix(scope: u32, net: &ipnet::IpNet) -> LpmKey<ScopedAddr> {
    let bits = u32::from(net.prefix_len());
    LpmKey::new(
        ScopedAddr::prefix_len(bits),
        ScopedAddr {
            scope_be: scope.to_be(),
            addr: addr_bytes(net.network()),
        },
    )
}

/// An address as the maps' 16 bytes (IPv4 in the first four).
pub fn addr_bytes(addr: std::net::IpAddr) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    match addr {
        std::net::IpAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.octets()),
        std::net::IpAddr::V6(v6) => bytes = v6.octets(),
    }
    bytes
}

/// One VIP's table for [`install_maglev_tables`]: slot i holds `backends[picks[i]]`, or
/// `NO_BACKEND` where `picks[i]` names no backend. VIPs with the same backends and weights share
/// `picks` (a Maglev table of indices), so no per-VIP copy of a table is ever held in memory.
pub struct TableWrite<'a> {
    pub vip_id: u32,
    pub picks: &'a [u32],
    pub backends: &'a [u32],
    /// Of what the table is built from (see [`Maps::maglev_fingerprint`]).
    pub fingerprint: u64,
}

/// Elements after a Maglev table's slots, holding the fingerprint of what the table was built
/// from (low half, high half). Written into the new inner map before it is swapped in, so it
/// always describes the table that is installed, whatever happened to a reconcile since.
/// The program never reads them (it picks a slot modulo the VIP's table size).
pub const FINGERPRINT_ELEMENTS: u32 = 2;

/// VIPs per batched update: bounds the descriptors held open at once (inner maps) well below
/// the usual 1024 limit.
const TABLE_BATCH: usize = 256;

/// Creates each VIP's Maglev table (filled through mmap in one copy, its fingerprint after it)
/// and swaps it into the VIP's outer slot: the one atomic step packets can observe. The tables
/// are created and filled, then swapped in with one batched update per [`TABLE_BATCH`] VIPs. The kernel waits for an RCU grace period
/// after each update of an outer map (so that no program still uses an old table when the call
/// returns), ~14 ms here: one wait per batch instead of one per VIP is what makes a sync of a
/// thousand VIPs take half a second instead of fourteen. Each VIP's swap is still atomic.
pub fn install_maglev_tables(maps: &mut Maps, tables: &[TableWrite<'_>]) -> anyhow::Result<()> {
    for chunk in tables.chunks(TABLE_BATCH) {
        let mut inners = Vec::with_capacity(chunk.len());
        for t in chunk {
            let size = u32::try_from(t.picks.len()).context("Maglev table too large")?;
            let total = size
                .checked_add(FINGERPRINT_ELEMENTS)
                .context("Maglev table too large")?;
            let inner = new_maglev_table(total)
                .with_context(|| format!("building the Maglev table of VIP #{}", t.vip_id))?;
            let mut mapping =
                MaglevMapping::new(&inner, total, libc::PROT_READ | libc::PROT_WRITE)?;
            mapping.write_picks(t.picks, t.backends);
            mapping.write_fingerprint(size, t.fingerprint);
            drop(mapping);
            inners.push(inner);
        }
        let keys: Vec<u32> = chunk.iter().map(|t| t.vip_id).collect();
        let fds: Vec<u32> = inners
            .iter()
            .map(|m| m.fd().as_fd().as_raw_fd() as u32)
            .collect();
        if chunk.len() > 1 && update_batch(&maps.maglev_fd, &keys, &fds).is_ok() {
            continue;
        }
        // One VIP, or a kernel without batched updates of this map type: one at a time.
        for (t, inner) in chunk.iter().zip(&inners) {
            maps.maglev
                .set(t.vip_id, inner, 0)
                .map_err(|e| anyhow!("swapping in the Maglev table of VIP #{}: {e}", t.vip_id))?;
        }
    }
    Ok(())
}

fn new_maglev_table(size: u32) -> anyhow::Result<MapData> {
    let obj = aya_obj::Map::new_from_params(
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
        4,
        4,
        size,
        MAGLEV_INNER_FLAGS,
    );
    MapData::create(obj, "sluice_maglev", None)
        .map_err(|e| anyhow!("creating a Maglev table of {size} slots: {e}"))
}

/// The batch member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}
const _: () = assert!(std::mem::size_of::<BatchAttr>() == 56);
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// `BPF_MAP_LOOKUP_BATCH` of a whole u32-keyed map from its start into `keys` and `values`
/// (as many entries as they hold); returns how many were read.
fn lookup_batch<V: Copy>(
    map: &OwnedFd,
    keys: &mut [u32],
    values: &mut [V],
) -> std::io::Result<usize> {
    let mut out_batch = 0u32;
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: &mut out_batch as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: keys.len().min(values.len()) as u32,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // The attribute points at buffers of `count` keys and values (V is the map's value type,
    // #[repr(C)]) and at the 4-byte batch token, all outliving the call.
    let rc = bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr);
    // ENOENT: the end of the map was reached; `count` says how many entries came back.
    if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT) {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr.count as usize)
}

/// `BPF_MAP_UPDATE_BATCH` of u32 keys and u32 values (here: inner map descriptors).
fn update_batch(map: &OwnedFd, keys: &[u32], values: &[u32]) -> std::io::Result<()> {
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len().min(values.len()) as u32,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // The attribute points at `count` keys and values that outlive the call.
    if bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr) < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The `bpf(2)` call of a batch command; the caller makes `attr`'s pointers valid for it.
fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> libc::c_long {
    // SAFETY: `attr` is a live, correctly sized attribute; its buffers are the caller's to
    // keep valid (both callers pass slices that outlive this call).
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    }
}

/// An mmap of an array map's values (`BPF_F_MMAPABLE`). The kernel lays array elements out
/// with a stride of the value size rounded up to 8 bytes: slot i of a u32 table is at 8 * i.
struct MaglevMapping {
    addr: *mut libc::c_void,
    len: usize,
    slots: usize,
}

const ARRAY_STRIDE: usize = 8;

impl MaglevMapping {
    fn new(map: &MapData, slots: u32, prot: libc::c_int) -> anyhow::Result<Self> {
        let slots = slots as usize;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = (slots * ARRAY_STRIDE).div_ceil(page) * page;
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the map's value area, of the map's rounded size.
        let addr = unsafe { libc::mmap(ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
        if addr == libc::MAP_FAILED {
            bail!(
                "mmap of a Maglev table: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self { addr, len, slots })
    }

    fn elements(&self) -> &[u64] {
        // SAFETY: the mapping holds `slots` 8-byte elements and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.addr as *const u64, self.slots) }
    }

    fn read(&self) -> Vec<u32> {
        // The u32 value sits in the first four bytes of each element.
        self.elements().iter().map(|e| element_value(*e)).collect()
    }

    /// Element i := backends[picks[i]], or NO_BACKEND.
    fn write_picks(&mut self, picks: &[u32], backends: &[u32]) {
        // SAFETY: as above, mapped writable by `new` when called with PROT_WRITE.
        let elements = unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u64, self.slots) };
        for (element, pick) in elements.iter_mut().zip(picks) {
            let slot = backends
                .get(*pick as usize)
                .copied()
                .unwrap_or(lb_common::NO_BACKEND);
            let mut bytes = [0u8; 8];
            bytes[..4].copy_from_slice(&slot.to_ne_bytes());
            *element = u64::from_ne_bytes(bytes);
        }
    }

    /// Elements `at` and `at + 1` := the two halves of `fingerprint`.
    fn write_fingerprint(&mut self, at: u32, fingerprint: u64) {
        // SAFETY: as above, mapped writable by `new` when called with PROT_WRITE.
        let elements = unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u64, self.slots) };
        let halves = [fingerprint as u32, (fingerprint >> 32) as u32];
        for (element, half) in elements.iter_mut().skip(at as usize).zip(halves) {
            let mut bytes = [0u8; 8];
            bytes[..4].copy_from_slice(&half.to_ne_bytes());
            *element = u64::from_ne_bytes(bytes);
        }
    }

    /// The fingerprint written by [`Self::write_fingerprint`] at `at`.
    fn fingerprint(&self, at: u32) -> Option<u64> {
        let mut halves = self.elements().iter().skip(at as usize);
        let low = u64::from(element_value(*halves.next()?));
        let high = u64::from(element_value(*halves.next()?));
        Some(low | (high << 32))
    }
}

/// The u32 value in the first four bytes of an array element.
fn element_value(element: u64) -> u32 {
    let b = element.to_ne_bytes();
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

impl Drop for MaglevMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}
