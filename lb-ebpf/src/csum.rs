//! Internet checksums (RFC 1071) as the XDP programs need them: whole small headers, and
//! incremental updates (RFC 1624) when one 16-bit word changes.

/// Folds a 32-bit-word sum into the final 16-bit one's-complement checksum (not inverted).
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    // Four folds reduce any 64-bit sum; written out so the verifier sees no loop.
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Checksum field value after one 16-bit word of the covered data changed from `old` to
/// `new` (all three in network order, as loaded): HC' = ~(~HC + ~m + m').
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u64) + (!old as u64) + (new as u64);
    !fold(sum)
}

/// Checksum of 16-bit words (network order, as loaded), to be stored as is.
#[inline(always)]
pub fn of_words<const N: usize>(words: &[u16; N]) -> u16 {
    let mut sum = 0u64;
    for w in words {
        sum += *w as u64;
    }
    !fold(sum)
}
