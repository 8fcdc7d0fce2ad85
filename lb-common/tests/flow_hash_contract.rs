//! The flow hash is a wire contract: every load balancer of a VIP, and every version across a
//! rolling upgrade, must compute the same hash for a flow, or they pick different backends and
//! established connections break. These values are pinned; a change to `FLOW_HASH_SEED`,
//! `flow_hash`, its word order or its finaliser fails here. Change them only on purpose, and
//! say in the release notes that every flow moves during the upgrade.

use core::net::IpAddr;

use lb_common::{
    FAMILY_V4, FAMILY_V6, FLOW_HASH_SEED, FlowKey, IPPROTO_TCP, IPPROTO_UDP, MAGLEV_ID_PRIME,
    MAGLEV_ID_SEED, flow_hash, maglev_id, raw_addr,
};

/// MurmurHash3_x86_32 written from Appleby's reference (SMHasher), independently of
/// `lb_common`: an IPv4 flow hash is exactly this function over the 16 bytes of source, destination,
/// ports and protocol words, so a bug shared by the pinned table and its generator still fails.
fn murmur3_x86_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut h = seed;
    let (blocks, tail) = data.as_chunks::<4>();
    for block in blocks {
        let mut k = u32::from_le_bytes(*block);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let mut k = 0u32;
    for (i, b) in tail.iter().enumerate() {
        k |= u32::from(*b) << (8 * i);
    }
    if !tail.is_empty() {
        h ^= k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[test]
fn the_reference_murmur3_matches_published_vectors() {
    // Published MurmurHash3_x86_32 test vectors: the reference above is the real function.
    for (input, seed, want) in [
        (&b""[..], 0, 0),
        (b"", 1, 0x514e_28b7),
        (b"", 0xffff_ffff, 0x81f1_6f39),
        (b"\0\0\0\0", 0, 0x2362_f9de),
        (b"aaaa", 0x9747_b28c, 0x5a97_808a),
        (b"Hello, world!", 0x9747_b28c, 0x2488_4cba),
        (
            b"The quick brown fox jumps over the lazy dog",
            0x9747_b28c,
            0x2fa8_26cd,
        ),
    ] {
        assert_eq!(
            murmur3_x86_32(input, seed),
            want,
            "murmur3({input:?}, {seed:#x})"
        );
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// The ports word as `flow_hash` documents it: `sport << 16 | dport` of the raw big-endian
/// fields as loaded from the packet.
fn ports_word(sport: u16, dport: u16) -> u32 {
    (u32::from(sport.to_be()) << 16) | u32::from(dport.to_be())
}

/// The key the program builds for a packet from `src:sport` to `dst:dport`.
fn key(src: &str, sport: u16, dst: &str, dport: u16, proto: u8) -> FlowKey {
    let (s, family) = raw_addr(ip(src));
    let (d, _) = raw_addr(ip(dst));
    FlowKey {
        src: s,
        dst: d,
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        family,
        _pad: [0; 2],
    }
}

/// (source, source port, destination, destination port, protocol, hash, affinity hash).
/// Generated once from the implementation (the IPv4 rows also equal the reference murmur3
/// below); if a deliberate change breaks them, the failure prints the new table.
type Golden = (&'static str, u16, &'static str, u16, u8, u32, u32);
const GOLDEN: [Golden; 10] = [
    (
        "10.0.0.1",
        40000,
        "10.100.0.1",
        80,
        IPPROTO_TCP,
        0x2c34_848e,
        0xf679_379b,
    ),
    (
        "10.0.0.1",
        40001,
        "10.100.0.1",
        80,
        IPPROTO_TCP,
        0x5e73_f0b9,
        0xf679_379b,
    ),
    (
        "10.0.0.2",
        40000,
        "10.100.0.1",
        80,
        IPPROTO_TCP,
        0x750a_5acc,
        0x0980_018f,
    ),
    (
        "192.0.2.200",
        53,
        "10.100.0.1",
        53,
        IPPROTO_UDP,
        0xe014_828b,
        0xd9cf_c7d3,
    ),
    (
        "203.0.113.9",
        65535,
        "198.51.100.1",
        443,
        IPPROTO_TCP,
        0xb9e1_e17a,
        0x4a0a_6a63,
    ),
    (
        "fd00::1",
        40000,
        "fd00:100::1",
        80,
        IPPROTO_TCP,
        0xd542_2fd6,
        0x90cc_a84b,
    ),
    (
        "fd00::1",
        40001,
        "fd00:100::1",
        80,
        IPPROTO_TCP,
        0xc4e3_ded0,
        0x90cc_a84b,
    ),
    (
        "fd00::2",
        40000,
        "fd00:100::1",
        80,
        IPPROTO_UDP,
        0x4db9_08b6,
        0xf077_0c6c,
    ),
    (
        "2001:db8:1:2:3:4:5:6",
        1,
        "2001:db8::80",
        8080,
        IPPROTO_UDP,
        0x10e6_53e3,
        0x6b3b_6c81,
    ),
    // The first words of 10.0.0.1 and 10.100.0.1 in IPv6 addresses: must not hash like them.
    (
        "a00:1::",
        40000,
        "a64:1::",
        80,
        IPPROTO_TCP,
        0x5011_60e5,
        0x1750_67a4,
    ),
];

#[test]
fn flow_hash_is_pinned_for_ipv4_ipv6_and_affinity() {
    assert_eq!(FLOW_HASH_SEED, 0x5eed_1ce5, "FLOW_HASH_SEED changed");
    let mut now = Vec::new();
    for (src, sport, dst, dport, proto, _, _) in GOLDEN {
        let k = key(src, sport, dst, dport, proto);
        now.push((src, sport, dst, dport, proto, k.hash(false), k.hash(true)));
    }
    if now != GOLDEN {
        let table: Vec<String> = now
            .iter()
            .map(|(s, sp, d, dp, p, h, a)| {
                format!("    ({s:?}, {sp}, {d:?}, {dp}, {p}, {h:#010x}, {a:#010x}),")
            })
            .collect();
        panic!(
            "the flow hash changed: load balancers of this and the previous version pick \
             different backends for the same flow. If that is deliberate, the new table is:\n{}",
            table.join("\n")
        );
    }
}

#[test]
fn flow_hash_entry_points_agree() {
    for (src, sport, dst, dport, proto, _, _) in GOLDEN {
        let k = key(src, sport, dst, dport, proto);
        assert_eq!(
            k.hash(false),
            flow_hash(
                &k.src,
                &k.dst,
                ports_word(sport, dport),
                u32::from(proto),
                k.family
            ),
            "FlowKey::hash vs flow_hash for {src}:{sport}"
        );
        assert_eq!(
            k.hash(true),
            flow_hash(&k.src, &k.dst, 0, u32::from(proto), k.family),
            "affinity must hash with ports 0 for {src}:{sport}"
        );
        if k.family == FAMILY_V4 {
            // The IPv4 narrow key (FLOWS) hashes like its wide form.
            assert_eq!(k.narrow().widen().hash(false), k.hash(false));
        }
    }
}

#[test]
fn ipv4_flow_hash_is_murmur3_of_the_header_words() {
    for (src, sport, dst, dport, proto, _, _) in GOLDEN {
        let k = key(src, sport, dst, dport, proto);
        if k.family != FAMILY_V4 {
            continue;
        }
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&k.src[0].to_le_bytes());
        bytes.extend_from_slice(&k.dst[0].to_le_bytes());
        bytes.extend_from_slice(&k.ports_word().to_le_bytes());
        bytes.extend_from_slice(&u32::from(proto).to_le_bytes());
        assert_eq!(
            k.hash(false),
            murmur3_x86_32(&bytes, FLOW_HASH_SEED),
            "{src}:{sport} -> {dst}:{dport}/{proto}"
        );
    }
}

#[test]
fn ipv6_flow_hash_reads_every_address_word() {
    // A change in any word of either address changes the hash (the IPv4 shortcut of hashing
    // word 0 only must not leak into IPv6).
    let base = key("fd00::1", 40000, "fd00:100::1", 80, IPPROTO_TCP);
    assert_eq!(base.family, FAMILY_V6);
    // An IPv6 flow whose first words are an IPv4 flow's does not hash like it.
    let v4 = key("10.0.0.1", 40000, "10.100.0.1", 80, IPPROTO_TCP);
    let v6 = key("a00:1::", 40000, "a64:1::", 80, IPPROTO_TCP);
    assert_eq!((v4.src[0], v4.dst[0]), (v6.src[0], v6.dst[0]));
    assert_ne!(v4.hash(false), v6.hash(false));
    for word in 0..4 {
        let mut k = base;
        k.src[word] ^= 1u32.to_be();
        assert_ne!(k.hash(false), base.hash(false), "source word {word}");
        let mut k = base;
        k.dst[word] ^= 1u32.to_be();
        assert_ne!(k.hash(false), base.hash(false), "destination word {word}");
    }
}

#[test]
fn maglev_identity_is_pinned() {
    assert_eq!(
        (MAGLEV_ID_SEED, MAGLEV_ID_PRIME),
        (0x6b43_a9b5, 0x0100_0193)
    );
    assert_eq!(
        maglev_id(ip("10.0.1.10")),
        0x0a00_010a,
        "an IPv4 id is its number"
    );
    let now = [
        maglev_id(ip("fd00:1::10")),
        maglev_id(ip("fd00:1::11")),
        maglev_id(ip("2001:db8::1")),
    ];
    assert_eq!(
        now,
        [0xfc31_77c4, 0xfd31_7957, 0xa708_164a],
        "the IPv6 Maglev identity changed: every table with IPv6 backends differs from the \
         previous version's. New values: {now:#010x?}"
    );
}
