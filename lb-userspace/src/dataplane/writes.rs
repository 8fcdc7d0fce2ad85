//! The writes a reconcile makes, one method per kind of entry: the reconcile decides what and
//! in which order (`reconcile::apply`), these say how, so that no aya type leaves `dataplane`.
//! Removals of entries already gone succeed: an interrupted reconcile may have made them.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use aya::maps::lpm_trie::Key as LpmKey;
use aya::maps::{MapError, PerCpuValues};
use lb_common::{
    Backend, Counters, FlowKey, FlowValue, MAX_PEERS, MemberKey, MemberWeight, PeerFilter, PeerKey,
    Settings as DataplaneSettings, TableInfo, VipFilter, VipInfo, VipKey, VipRef, handed_on_mac,
    peer_frame,
};

use super::{Maps, RangeKey};

/// `Ok` for a removal whose key was already gone.
fn removed(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e),
    }
}

impl Maps {
    /// Lets backends behind interface `ifindex` be reached by `XDP_REDIRECT`.
    pub fn add_tx_port(&mut self, ifindex: u32) -> anyhow::Result<()> {
        self.tx_ports
            .insert(ifindex, ifindex, None, 0)
            .with_context(|| format!("adding ifindex {ifindex} to TX_PORTS"))
    }

    /// Writes backend entry `id`.
    pub fn write_backend(&mut self, id: u32, value: &Backend) -> anyhow::Result<()> {
        self.backends
            .set(id, value, 0)
            .with_context(|| format!("writing backend #{id}"))
    }

    /// Zeroes a backend's counters (a new backend starts from nothing).
    pub fn reset_backend_counters(&mut self, id: u32) -> anyhow::Result<()> {
        let zeros = self.per_cpu_zeros()?;
        self.backend_stats
            .set(id, zeros, 0)
            .with_context(|| format!("resetting counters of backend #{id}"))
    }

    /// Writes VIP id `id`'s `VIP_BY_ID` entry (a default one clears it).
    pub fn write_vip_ref(&mut self, id: u32, value: &VipRef) -> anyhow::Result<()> {
        self.vip_by_id
            .set(id, value, 0)
            .with_context(|| format!("writing VIP #{id} of VIP_BY_ID"))
    }

    /// Writes table `id`'s description (`TABLES`).
    pub fn write_table_info(&mut self, id: u32, info: &TableInfo) -> anyhow::Result<()> {
        self.tables
            .set(id, info, 0)
            .with_context(|| format!("writing table #{id} of TABLES"))
    }

    /// Table `id`'s entry in `TABLES` whatever its fingerprint, `None` when it has no members.
    pub fn table_bits(&self, id: u32) -> anyhow::Result<Option<TableInfo>> {
        let info = self
            .tables
            .get(&id, 0)
            .with_context(|| format!("reading table #{id} of TABLES"))?;
        Ok(info.bits.iter().any(|w| *w != 0).then_some(info))
    }

    pub fn write_member(&mut self, key: &MemberKey, weight: MemberWeight) -> anyhow::Result<()> {
        self.table_members
            .insert(key, &weight, 0)
            .with_context(|| format!("writing member #{} of table #{}", key.backend, key.table))
    }

    pub fn remove_member(&mut self, key: &MemberKey) -> anyhow::Result<()> {
        removed(self.table_members.remove(key))
            .with_context(|| format!("removing member #{} of table #{}", key.backend, key.table))
    }

    /// Writes a VIP's entry.
    pub fn write_vip(&mut self, key: &VipKey, info: &VipInfo) -> anyhow::Result<()> {
        self.vips
            .insert(key, info, 0)
            .with_context(|| format!("writing VIP #{}", info.id))
    }

    pub fn remove_vip(&mut self, key: &VipKey, id: u32) -> anyhow::Result<()> {
        removed(self.vips.remove(key)).with_context(|| format!("removing VIP #{id}"))
    }

    /// Zeroes a VIP's counters (a new VIP starts from nothing).
    pub fn reset_vip_counters(&mut self, vip_id: u32) -> anyhow::Result<()> {
        let zeros = self.per_cpu_zeros()?;
        self.vip_stats
            .set(vip_id, zeros, 0)
            .with_context(|| format!("resetting counters of VIP #{vip_id}"))
    }

    /// Writes how many VIPs share the address `key` ([`VipKey::address_only`]).
    pub fn write_vip_addr(&mut self, key: &VipKey, count: u32) -> anyhow::Result<()> {
        self.vip_addrs
            .insert(key, &count, 0)
            .context("writing VIP_ADDRS")
    }

    pub fn remove_vip_addr(&mut self, key: &VipKey) -> anyhow::Result<()> {
        removed(self.vip_addrs.remove(key)).context("removing a VIP address")
    }

    pub fn add_source_range(&mut self, (prefix_len, data): &RangeKey) -> anyhow::Result<()> {
        self.source_ranges
            .insert(&LpmKey::new(*prefix_len, *data), &1, 0)
            .context("writing SOURCE_RANGES")
    }

    pub fn remove_source_range(&mut self, (prefix_len, data): &RangeKey) -> anyhow::Result<()> {
        removed(self.source_ranges.remove(&LpmKey::new(*prefix_len, *data)))
            .context("removing a source range")
    }

    /// Rewrites the VIP address filter (nothing when it already holds `filter`). Bits that
    /// stay set are rewritten with the same value: no packet sees one clear meanwhile.
    pub fn write_vip_filter(&mut self, filter: &VipFilter) -> anyhow::Result<()> {
        if self.vip_filter.get(&0, 0).ok().as_ref() == Some(filter) {
            return Ok(());
        }
        self.vip_filter
            .set(0, filter, 0)
            .context("writing the VIP address filter")
    }

    /// Writes `SETTINGS` (nothing when it already holds `want`).
    pub fn write_settings(&mut self, want: DataplaneSettings) -> anyhow::Result<()> {
        if self.settings.get(&0, 0).ok() == Some(want) {
            return Ok(());
        }
        self.settings.set(0, &want, 0).context("writing SETTINGS")
    }

    /// Brings `PEERS` and its filter to `want`: each peer by its own MAC (a frame it balanced)
    /// and by that MAC's twin (a frame it handed on, `handed_on_mac`). New entries are in
    /// `PEERS` before their filter bits are set, and gone ones' bits are cleared before they
    /// leave: a peer's frame never misses both.
    pub fn sync_peers(&mut self, want: &BTreeSet<PeerKey>) -> anyhow::Result<()> {
        let want = peer_entries(want);
        let mut have = BTreeMap::new();
        for key in self.peers.keys() {
            let key = key.context("reading the PEERS map")?;
            let kind = self.peers.get(&key, 0).context("reading the PEERS map")?;
            have.insert(key, kind);
        }
        let mut filter = PeerFilter::default();
        for key in want.keys() {
            filter.insert(&key.mac);
        }
        for (key, kind) in &want {
            if have.get(key) != Some(kind) {
                self.peers.insert(key, kind, 0).context("writing PEERS")?;
            }
        }
        if self.peer_filter.get(&0, 0).ok() != Some(filter) {
            self.peer_filter
                .set(0, &filter, 0)
                .context("writing PEER_FILTER")?;
        }
        for key in have.keys().filter(|key| !want.contains_key(key)) {
            removed(self.peers.remove(key)).context("removing from PEERS")?;
        }
        Ok(())
    }

    /// Brings the inline decapsulator's sets to the allowed outer sources and local addresses.
    pub fn sync_decap(
        &mut self,
        allow: &[ipnet::IpNet],
        local: &[std::net::IpAddr],
    ) -> anyhow::Result<()> {
        self.decap.sync(allow, local)
    }

    /// Records a flow in the connection table as the program would. Only tests and benchmarks
    /// call it (to fill a table without traffic): the program records flows itself.
    pub fn insert_flow(&mut self, key: &FlowKey, value: &FlowValue) -> anyhow::Result<()> {
        if key.family == lb_common::FAMILY_V4 {
            self.flows.insert(&key.narrow(), value, 0)
        } else {
            self.flows6.insert(key, value, 0)
        }
        .context("writing the connection table")
    }

    /// Answers ARP (or Neighbor Solicitations) for `addr` with `mac`, as the agent's announcer
    /// does through its own [`AnnounceMap`](super::AnnounceMap) (fixtures call this one).
    pub fn announce_address(&mut self, addr: std::net::IpAddr, mac: [u8; 6]) -> anyhow::Result<()> {
        let value = lb_common::Announce { mac, _pad: [0; 2] };
        self.announce
            .insert(&super::announce_key(addr), &value, 0)
            .with_context(|| format!("writing {addr} into the ANNOUNCE map"))
    }

    /// Stops answering for `addr` (absent already is fine).
    pub fn withdraw_address(&mut self, addr: std::net::IpAddr) -> anyhow::Result<()> {
        removed(self.announce.remove(&super::announce_key(addr)))
            .with_context(|| format!("removing {addr} from the ANNOUNCE map"))
    }

    /// Empties `ANNOUNCE`: an agent without `--announce` answers ARP for nothing, whatever an
    /// earlier run left there.
    pub fn clear_announced(&mut self) -> anyhow::Result<()> {
        let keys: Vec<VipKey> = self
            .announce
            .keys()
            .collect::<Result<_, _>>()
            .context("reading the ANNOUNCE map")?;
        for key in keys {
            removed(self.announce.remove(&key)).context("removing an entry of the ANNOUNCE map")?;
        }
        Ok(())
    }

    /// Per-CPU zeros, one value per possible CPU (what a per-CPU array's element holds).
    fn per_cpu_zeros(&self) -> anyhow::Result<PerCpuValues<Counters>> {
        // aya reads the possible CPUs once per thread: a reconcile adding thousands of slots
        // does not pay a map read for each.
        let cpus = aya::util::nr_cpus()
            .map_err(|(path, e)| anyhow::anyhow!("reading {path}: {e}"))?
            .get() as usize;
        PerCpuValues::try_from(vec![Counters::default(); cpus]).context("building per-CPU zeros")
    }
}

/// The `PEERS` entries for these peers: each MAC as a first hop, its twin as handed on. A twin
/// that is another peer's own MAC (two MACs one bit apart) stays that peer's first hop: its
/// frames are every packet, the twin's only the rare handed-on one. Two entries per peer: the
/// peers beyond half of `MAX_PEERS` are cut.
fn peer_entries(peers: &BTreeSet<PeerKey>) -> BTreeMap<PeerKey, u8> {
    let peers = || peers.iter().take(MAX_PEERS as usize / 2);
    let twins = peers().map(|key| {
        let twin = PeerKey::new(handed_on_mac(key.mac));
        (twin, peer_frame::HANDED_ON)
    });
    let own = peers().map(|key| (*key, peer_frame::FIRST_HOP));
    twins.chain(own).collect()
}
