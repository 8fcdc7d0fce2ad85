//! The other sluice nodes on the segment (`PEERS`, `PEER_FILTER`): their frames were
//! balanced already.
//!
//! Each peer is there twice, by the two source MACs its frames may carry (the `PEERS` value
//! says which, [`peer_frame`]): its own MAC on a frame it balanced (the first hop), and that
//! MAC's locally-administered twin ([`handed_on_mac`]) on a frame it handed on to the
//! previous table's pick (second chance, docs/design.md).

/// Bits of the peer filter: far more than the nodes of one segment, so a client's frame almost
/// never needs the exact `PEERS` lookup.
pub const PEER_FILTER_BITS: u32 = 512;

/// The `PEERS` pre-filter (one array element, read without a hash lookup): one bit per hash
/// bucket of peer MACs. A frame whose source MAC's bit is clear is no peer's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerFilter {
    pub words: [u64; (PEER_FILTER_BITS / 64) as usize],
}

impl PeerFilter {
    #[inline(always)]
    pub const fn bit(mac: &[u8; 6]) -> u32 {
        let folded = u32::from_ne_bytes([mac[0] ^ mac[4], mac[1] ^ mac[5], mac[2], mac[3]]);
        folded.wrapping_mul(0x9e37_79b1) >> (32 - PEER_FILTER_BITS.trailing_zeros())
    }

    #[inline(always)]
    pub const fn may_contain(&self, mac: &[u8; 6]) -> bool {
        let bit = Self::bit(mac);
        self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    pub fn insert(&mut self, mac: &[u8; 6]) {
        let bit = Self::bit(mac);
        self.words[(bit / 64) as usize] |= 1 << (bit % 64);
    }
}

/// The `PEERS` value: what a frame from that source MAC is.
pub mod peer_frame {
    /// Balanced by the peer (the first hop) by its current table: the receiver, if it is the
    /// pick and runs in second-chance mode, may still hand it on once.
    pub const FIRST_HOP: u8 = 1;
    /// Handed on by second chance: the receiver passes it to its stack, never hands it on.
    pub const HANDED_ON: u8 = 2;
}

/// The source MAC of a frame second chance hands on: the node's MAC with the
/// locally-administered bit (0x02 of the first byte) flipped. Only the rare handed-on frame
/// carries it, so a network that drops frames from MACs it did not learn (port security,
/// a cloud fabric) loses those, never the first hop's every frame.
#[inline(always)]
pub const fn handed_on_mac(mac: [u8; 6]) -> [u8; 6] {
    let mut twin = mac;
    twin[0] ^= 0x02;
    twin
}

/// Key of the `PEERS` map: the MAC of another sluice node on the attached segment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

impl PeerKey {
    pub const fn new(mac: [u8; 6]) -> Self {
        Self { mac, _pad: [0; 2] }
    }
}
