//! The other sluice nodes on the segment (`PEERS`, `PEER_FILTER`): their frames were
//! balanced already.

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
