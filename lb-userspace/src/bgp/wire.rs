//! The BGP-4 wire format (RFC 4271) with what an announce-only speaker needs: OPEN with
//! capabilities (multiprotocol RFC 4760, route refresh RFC 2918, 4-octet AS RFC 6793), UPDATE
//! with IPv4 NLRI and MP_REACH/MP_UNREACH for IPv6, KEEPALIVE, NOTIFICATION, ROUTE-REFRESH.
//!
//! `decode` never panics on any input (fuzzed in the tests below) and reports malformed input
//! as the NOTIFICATION code/subcode the RFC asks for. Attributes it does not interpret are kept
//! as raw bytes, so every message it accepts encodes back to an equal message.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

pub const HEADER_LEN: usize = 19;
pub const MAX_MESSAGE_LEN: usize = 4096;
pub const BGP_PORT: u16 = 179;
/// The 2-octet stand-in for a 4-octet AS number (RFC 6793).
pub const AS_TRANS: u16 = 23456;

pub const AFI_IPV4: u16 = 1;
pub const AFI_IPV6: u16 = 2;
pub const SAFI_UNICAST: u8 = 1;

/// RFC 8326 graceful shutdown: receivers lower the route's preference (FRR: local-pref 0).
pub const GRACEFUL_SHUTDOWN: u32 = 0xffff_0000;

const TYPE_OPEN: u8 = 1;
const TYPE_UPDATE: u8 = 2;
const TYPE_NOTIFICATION: u8 = 3;
const TYPE_KEEPALIVE: u8 = 4;
const TYPE_ROUTE_REFRESH: u8 = 5;

const CAP_MULTIPROTOCOL: u8 = 1;
const CAP_ROUTE_REFRESH: u8 = 2;
const CAP_FOUR_OCTET_AS: u8 = 65;
const PARAM_CAPABILITIES: u8 = 2;

const ATTR_ORIGIN: u8 = 1;
const ATTR_AS_PATH: u8 = 2;
const ATTR_NEXT_HOP: u8 = 3;
const ATTR_MED: u8 = 4;
const ATTR_LOCAL_PREF: u8 = 5;
const ATTR_COMMUNITIES: u8 = 8;
const ATTR_MP_REACH: u8 = 14;
const ATTR_MP_UNREACH: u8 = 15;
const ATTR_AS4_PATH: u8 = 17;

const FLAG_OPTIONAL: u8 = 0x80;
const FLAG_TRANSITIVE: u8 = 0x40;
const FLAG_EXTENDED: u8 = 0x10;

/// NOTIFICATION error codes (RFC 4271 section 4.5).
pub mod code {
    pub const HEADER: u8 = 1;
    pub const OPEN: u8 = 2;
    pub const UPDATE: u8 = 3;
    pub const HOLD_TIMER: u8 = 4;
    pub const FSM: u8 = 5;
    pub const CEASE: u8 = 6;
    /// Cease subcode: administrative shutdown (RFC 4486).
    pub const CEASE_ADMIN_SHUTDOWN: u8 = 2;
}

/// Malformed input, as the NOTIFICATION it calls for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireError {
    pub code: u8,
    pub subcode: u8,
    pub what: String,
}

impl WireError {
    fn new(code: u8, subcode: u8, what: impl Into<String>) -> Self {
        Self {
            code,
            subcode,
            what: what.into(),
        }
    }

    /// The NOTIFICATION to send back.
    pub fn notification(&self) -> Notification {
        Notification {
            code: self.code,
            subcode: self.subcode,
            data: Vec::new(),
        }
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (NOTIFICATION {}/{})",
            self.what, self.code, self.subcode
        )
    }
}

impl std::error::Error for WireError {}

type Result<T> = std::result::Result<T, WireError>;

fn update_error(subcode: u8, what: impl Into<String>) -> WireError {
    WireError::new(code::UPDATE, subcode, what)
}

/// Every BGP message this speaker sends or understands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification(Notification),
    Keepalive,
    RouteRefresh { afi: u16, safi: u8 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    pub version: u8,
    /// The 2-octet "My AS" field: AS_TRANS when the real number needs 4 octets.
    pub my_as: u16,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    pub capabilities: Vec<Capability>,
}

impl Open {
    /// The peer's real AS: its 4-octet capability, else the 2-octet field.
    pub fn asn(&self) -> u32 {
        self.capabilities
            .iter()
            .find_map(|c| match c {
                Capability::FourOctetAs(asn) => Some(*asn),
                _ => None,
            })
            .unwrap_or(u32::from(self.my_as))
    }

    pub fn has(&self, wanted: &Capability) -> bool {
        self.capabilities.contains(wanted)
    }

    pub fn four_octet_as(&self) -> bool {
        self.capabilities
            .iter()
            .any(|c| matches!(c, Capability::FourOctetAs(_)))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capability {
    Multiprotocol { afi: u16, safi: u8 },
    RouteRefresh,
    FourOctetAs(u32),
    Other { code: u8, value: Vec<u8> },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    pub withdrawn: Vec<Ipv4Net>,
    pub attributes: Vec<Attribute>,
    pub nlri: Vec<Ipv4Net>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

impl fmt::Display for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match (self.code, self.subcode) {
            (code::HEADER, _) => "message header error",
            (code::OPEN, 2) => "OPEN: bad peer AS",
            (code::OPEN, 4) => "OPEN: unsupported optional parameter",
            (code::OPEN, 6) => "OPEN: unacceptable hold time",
            (code::OPEN, 7) => "OPEN: unsupported capability",
            (code::OPEN, _) => "OPEN message error",
            (code::UPDATE, _) => "UPDATE message error",
            (code::HOLD_TIMER, _) => "hold timer expired",
            (code::FSM, _) => "finite state machine error",
            (code::CEASE, 2) => "cease: administrative shutdown",
            (code::CEASE, 3) => "cease: peer de-configured",
            (code::CEASE, 4) => "cease: administrative reset",
            (code::CEASE, 5) => "cease: connection rejected",
            (code::CEASE, 7) => "cease: connection collision resolution",
            (code::CEASE, _) => "cease",
            _ => "unknown error",
        };
        write!(f, "{what} ({}/{})", self.code, self.subcode)
    }
}

/// An AS_PATH segment: 2 = AS_SEQUENCE, 1 = AS_SET (others kept as they are).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub kind: u8,
    pub asns: Vec<u32>,
}

pub const AS_SEQUENCE: u8 = 2;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attribute {
    /// 0 IGP, 1 EGP, 2 incomplete.
    Origin(u8),
    /// Encoded with 4-octet numbers when the session negotiated them, else 2-octet.
    AsPath(Vec<Segment>),
    NextHop(Ipv4Addr),
    Med(u32),
    LocalPref(u32),
    Communities(Vec<u32>),
    MpReach {
        afi: u16,
        safi: u8,
        next_hop: Vec<u8>,
        nlri: Vec<IpNet>,
    },
    MpUnreach {
        afi: u16,
        safi: u8,
        withdrawn: Vec<IpNet>,
    },
    /// Always 4-octet numbers (sent beside a 2-octet AS_PATH).
    As4Path(Vec<Segment>),
    Other {
        flags: u8,
        code: u8,
        value: Vec<u8>,
    },
}

/// What decoding depends on: the negotiated AS number width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    pub four_octet_as: bool,
}

// ----------------------------------------------------------------------------------------------
// Decoding

/// A cursor over bytes whose every read is checked.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, err: impl FnOnce() -> WireError) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(err());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self, err: impl FnOnce() -> WireError) -> Result<u8> {
        Ok(self.take(1, err)?[0])
    }
    fn u16(&mut self, err: impl FnOnce() -> WireError) -> Result<u16> {
        let b = self.take(2, err)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, err: impl FnOnce() -> WireError) -> Result<u32> {
        let b = self.take(4, err)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// The length of the message starting at `header` (which holds at least [`HEADER_LEN`] bytes),
/// after checking the marker and the length's bounds.
pub fn message_len(header: &[u8]) -> Result<usize> {
    if header.len() < HEADER_LEN {
        return Err(WireError::new(
            code::HEADER,
            2,
            "message shorter than its header",
        ));
    }
    if header[..16].iter().any(|b| *b != 0xff) {
        return Err(WireError::new(code::HEADER, 1, "marker is not all ones"));
    }
    let len = usize::from(u16::from_be_bytes([header[16], header[17]]));
    if !(HEADER_LEN..=MAX_MESSAGE_LEN).contains(&len) {
        return Err(WireError::new(
            code::HEADER,
            2,
            format!("message length {len} outside {HEADER_LEN}..={MAX_MESSAGE_LEN}"),
        ));
    }
    Ok(len)
}

/// Decodes one whole message (header included).
pub fn decode(msg: &[u8], ctx: Context) -> Result<Message> {
    let len = message_len(msg)?;
    if len != msg.len() {
        return Err(WireError::new(
            code::HEADER,
            2,
            format!("length field {len} but {} bytes", msg.len()),
        ));
    }
    let body = &msg[HEADER_LEN..];
    let bad_len = |what: &str| WireError::new(code::HEADER, 2, format!("{what}: bad length"));
    match msg[18] {
        TYPE_OPEN => decode_open(body),
        TYPE_UPDATE => decode_update(body, ctx).map(Message::Update),
        TYPE_NOTIFICATION => {
            if body.len() < 2 {
                return Err(bad_len("NOTIFICATION"));
            }
            Ok(Message::Notification(Notification {
                code: body[0],
                subcode: body[1],
                data: body[2..].to_vec(),
            }))
        }
        TYPE_KEEPALIVE if body.is_empty() => Ok(Message::Keepalive),
        TYPE_KEEPALIVE => Err(bad_len("KEEPALIVE")),
        TYPE_ROUTE_REFRESH if body.len() == 4 => Ok(Message::RouteRefresh {
            afi: u16::from_be_bytes([body[0], body[1]]),
            safi: body[3],
        }),
        TYPE_ROUTE_REFRESH => Err(bad_len("ROUTE-REFRESH")),
        other => Err(WireError::new(
            code::HEADER,
            3,
            format!("unknown message type {other}"),
        )),
    }
}

fn decode_open(body: &[u8]) -> Result<Message> {
    let short = || WireError::new(code::OPEN, 0, "OPEN truncated");
    let mut r = Reader { buf: body };
    let version = r.u8(short)?;
    let my_as = r.u16(short)?;
    let hold_time = r.u16(short)?;
    let router_id = Ipv4Addr::from(r.u32(short)?);
    let params_len = usize::from(r.u8(short)?);
    let params = r.take(params_len, short)?;
    if !r.is_empty() {
        return Err(WireError::new(
            code::OPEN,
            0,
            "OPEN longer than its parameters",
        ));
    }
    let mut capabilities = Vec::new();
    let mut p = Reader { buf: params };
    while !p.is_empty() {
        let kind = p.u8(short)?;
        let len = usize::from(p.u8(short)?);
        let value = p.take(len, short)?;
        if kind != PARAM_CAPABILITIES {
            return Err(WireError::new(
                code::OPEN,
                4,
                format!("unsupported optional parameter {kind}"),
            ));
        }
        let mut c = Reader { buf: value };
        while !c.is_empty() {
            let code = c.u8(short)?;
            let len = usize::from(c.u8(short)?);
            let value = c.take(len, short)?;
            capabilities.push(match (code, len) {
                (CAP_MULTIPROTOCOL, 4) => Capability::Multiprotocol {
                    afi: u16::from_be_bytes([value[0], value[1]]),
                    safi: value[3],
                },
                (CAP_ROUTE_REFRESH, 0) => Capability::RouteRefresh,
                (CAP_FOUR_OCTET_AS, 4) => Capability::FourOctetAs(u32::from_be_bytes([
                    value[0], value[1], value[2], value[3],
                ])),
                _ => Capability::Other {
                    code,
                    value: value.to_vec(),
                },
            });
        }
    }
    Ok(Message::Open(Open {
        version,
        my_as,
        hold_time,
        router_id,
        capabilities,
    }))
}

fn decode_prefix(r: &mut Reader<'_>, afi: u16) -> Result<IpNet> {
    let bad = || update_error(10, "invalid network field");
    let len = r.u8(bad)?;
    let max = if afi == AFI_IPV4 { 32 } else { 128 };
    if len > max {
        return Err(bad());
    }
    let bytes = r.take(usize::from(len).div_ceil(8), bad)?;
    // Bits past the prefix length are ignored (truncated), as receivers do.
    Ok(if afi == AFI_IPV4 {
        let mut a = [0u8; 4];
        a[..bytes.len()].copy_from_slice(bytes);
        IpNet::V4(
            Ipv4Net::new(Ipv4Addr::from(a), len)
                .map_err(|_| bad())?
                .trunc(),
        )
    } else {
        let mut a = [0u8; 16];
        a[..bytes.len()].copy_from_slice(bytes);
        IpNet::V6(
            Ipv6Net::new(Ipv6Addr::from(a), len)
                .map_err(|_| bad())?
                .trunc(),
        )
    })
}

fn decode_v4_prefixes(bytes: &[u8]) -> Result<Vec<Ipv4Net>> {
    let mut r = Reader { buf: bytes };
    let mut out = Vec::new();
    while !r.is_empty() {
        if let IpNet::V4(p) = decode_prefix(&mut r, AFI_IPV4)? {
            out.push(p);
        }
    }
    Ok(out)
}

fn decode_prefixes(bytes: &[u8], afi: u16) -> Result<Vec<IpNet>> {
    let mut r = Reader { buf: bytes };
    let mut out = Vec::new();
    while !r.is_empty() {
        out.push(decode_prefix(&mut r, afi)?);
    }
    Ok(out)
}

fn decode_update(body: &[u8], ctx: Context) -> Result<Update> {
    let malformed = || update_error(1, "malformed attribute list");
    let mut r = Reader { buf: body };
    let withdrawn_len = usize::from(r.u16(malformed)?);
    let withdrawn = decode_v4_prefixes(r.take(withdrawn_len, malformed)?)?;
    let attrs_len = usize::from(r.u16(malformed)?);
    let attrs = r.take(attrs_len, malformed)?;
    let nlri = decode_v4_prefixes(r.buf)?;
    let mut attributes = Vec::new();
    let mut a = Reader { buf: attrs };
    while !a.is_empty() {
        let flags = a.u8(malformed)?;
        let code = a.u8(malformed)?;
        let len = if flags & FLAG_EXTENDED != 0 {
            usize::from(a.u16(malformed)?)
        } else {
            usize::from(a.u8(malformed)?)
        };
        let value = a.take(len, || update_error(5, "attribute length error"))?;
        if attributes.iter().any(|x: &Attribute| x.code() == code) {
            return Err(malformed());
        }
        attributes.push(decode_attribute(flags, code, value, ctx)?);
    }
    Ok(Update {
        withdrawn,
        attributes,
        nlri,
    })
}

fn decode_segments(value: &[u8], four: bool) -> Result<Vec<Segment>> {
    let bad = || update_error(11, "malformed AS_PATH");
    let mut r = Reader { buf: value };
    let mut out = Vec::new();
    while !r.is_empty() {
        let kind = r.u8(bad)?;
        let n = r.u8(bad)?;
        if n == 0 {
            return Err(bad());
        }
        let mut asns = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            asns.push(if four {
                r.u32(bad)?
            } else {
                u32::from(r.u16(bad)?)
            });
        }
        out.push(Segment { kind, asns });
    }
    Ok(out)
}

fn decode_attribute(flags: u8, code: u8, value: &[u8], ctx: Context) -> Result<Attribute> {
    // The extended-length bit says how the length was encoded, nothing about the attribute.
    let flags = flags & !FLAG_EXTENDED;
    let len_err = |what: &str| update_error(5, format!("{what}: attribute length error"));
    let fixed = |n: usize, what: &str| {
        if value.len() == n {
            Ok(())
        } else {
            Err(len_err(what))
        }
    };
    // Only the flags of our own encoding are decoded into variants; anything else is kept raw,
    // so that decode -> encode reproduces it.
    let expected = well_known_flags(code);
    if expected.is_some_and(|f| flags != f) {
        return Ok(Attribute::Other {
            flags,
            code,
            value: value.to_vec(),
        });
    }
    Ok(match code {
        ATTR_ORIGIN => {
            fixed(1, "ORIGIN")?;
            if value[0] > 2 {
                return Err(update_error(6, "invalid ORIGIN"));
            }
            Attribute::Origin(value[0])
        }
        ATTR_AS_PATH => Attribute::AsPath(decode_segments(value, ctx.four_octet_as)?),
        ATTR_AS4_PATH => Attribute::As4Path(decode_segments(value, true)?),
        ATTR_NEXT_HOP => {
            fixed(4, "NEXT_HOP")?;
            Attribute::NextHop(Ipv4Addr::new(value[0], value[1], value[2], value[3]))
        }
        ATTR_MED | ATTR_LOCAL_PREF => {
            fixed(4, "MED/LOCAL_PREF")?;
            let v = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
            if code == ATTR_MED {
                Attribute::Med(v)
            } else {
                Attribute::LocalPref(v)
            }
        }
        ATTR_COMMUNITIES => {
            if !value.len().is_multiple_of(4) {
                return Err(len_err("COMMUNITIES"));
            }
            Attribute::Communities(
                value
                    .as_chunks::<4>()
                    .0
                    .iter()
                    .map(|c| u32::from_be_bytes(*c))
                    .collect(),
            )
        }
        ATTR_MP_REACH => {
            let bad = || update_error(9, "malformed MP_REACH_NLRI");
            let mut r = Reader { buf: value };
            let afi = r.u16(bad)?;
            let safi = r.u8(bad)?;
            let nh_len = usize::from(r.u8(bad)?);
            let next_hop = r.take(nh_len, bad)?.to_vec();
            let _reserved = r.u8(bad)?;
            if !matches!(afi, AFI_IPV4 | AFI_IPV6) || safi != SAFI_UNICAST {
                return Ok(Attribute::Other {
                    flags,
                    code,
                    value: value.to_vec(),
                });
            }
            Attribute::MpReach {
                afi,
                safi,
                next_hop,
                nlri: decode_prefixes(r.buf, afi)?,
            }
        }
        ATTR_MP_UNREACH => {
            let bad = || update_error(9, "malformed MP_UNREACH_NLRI");
            let mut r = Reader { buf: value };
            let afi = r.u16(bad)?;
            let safi = r.u8(bad)?;
            if !matches!(afi, AFI_IPV4 | AFI_IPV6) || safi != SAFI_UNICAST {
                return Ok(Attribute::Other {
                    flags,
                    code,
                    value: value.to_vec(),
                });
            }
            Attribute::MpUnreach {
                afi,
                safi,
                withdrawn: decode_prefixes(r.buf, afi)?,
            }
        }
        _ => Attribute::Other {
            flags,
            code,
            value: value.to_vec(),
        },
    })
}

/// The flags (without the extended-length bit) this speaker encodes each known attribute with.
fn well_known_flags(code: u8) -> Option<u8> {
    match code {
        ATTR_ORIGIN | ATTR_AS_PATH | ATTR_NEXT_HOP | ATTR_LOCAL_PREF => Some(FLAG_TRANSITIVE),
        ATTR_MED | ATTR_MP_REACH | ATTR_MP_UNREACH => Some(FLAG_OPTIONAL),
        ATTR_COMMUNITIES | ATTR_AS4_PATH => Some(FLAG_OPTIONAL | FLAG_TRANSITIVE),
        _ => None,
    }
}

// ----------------------------------------------------------------------------------------------
// Encoding

impl Attribute {
    pub fn code(&self) -> u8 {
        match self {
            Attribute::Origin(_) => ATTR_ORIGIN,
            Attribute::AsPath(_) => ATTR_AS_PATH,
            Attribute::NextHop(_) => ATTR_NEXT_HOP,
            Attribute::Med(_) => ATTR_MED,
            Attribute::LocalPref(_) => ATTR_LOCAL_PREF,
            Attribute::Communities(_) => ATTR_COMMUNITIES,
            Attribute::MpReach { .. } => ATTR_MP_REACH,
            Attribute::MpUnreach { .. } => ATTR_MP_UNREACH,
            Attribute::As4Path(_) => ATTR_AS4_PATH,
            Attribute::Other { code, .. } => *code,
        }
    }
}

fn put_prefix(out: &mut Vec<u8>, p: IpNet) {
    let len = p.prefix_len();
    out.push(len);
    let n = usize::from(len).div_ceil(8);
    match p {
        IpNet::V4(v4) => out.extend_from_slice(&v4.network().octets()[..n]),
        IpNet::V6(v6) => out.extend_from_slice(&v6.network().octets()[..n]),
    }
}

/// Encoded size of a prefix in NLRI.
pub fn prefix_len_on_wire(p: IpNet) -> usize {
    1 + usize::from(p.prefix_len()).div_ceil(8)
}

fn put_segments(out: &mut Vec<u8>, segments: &[Segment], four: bool) {
    for s in segments {
        out.push(s.kind);
        out.push(s.asns.len() as u8);
        for asn in &s.asns {
            if four {
                out.extend_from_slice(&asn.to_be_bytes());
            } else {
                let two = u16::try_from(*asn).unwrap_or(AS_TRANS);
                out.extend_from_slice(&two.to_be_bytes());
            }
        }
    }
}

fn encode_attribute(out: &mut Vec<u8>, a: &Attribute, ctx: Context) {
    let mut value = Vec::new();
    match a {
        Attribute::Origin(o) => value.push(*o),
        Attribute::AsPath(s) => put_segments(&mut value, s, ctx.four_octet_as),
        Attribute::As4Path(s) => put_segments(&mut value, s, true),
        Attribute::NextHop(nh) => value.extend_from_slice(&nh.octets()),
        Attribute::Med(v) | Attribute::LocalPref(v) => value.extend_from_slice(&v.to_be_bytes()),
        Attribute::Communities(c) => {
            for v in c {
                value.extend_from_slice(&v.to_be_bytes());
            }
        }
        Attribute::MpReach {
            afi,
            safi,
            next_hop,
            nlri,
        } => {
            value.extend_from_slice(&afi.to_be_bytes());
            value.push(*safi);
            value.push(next_hop.len() as u8);
            value.extend_from_slice(next_hop);
            value.push(0);
            for p in nlri {
                put_prefix(&mut value, *p);
            }
        }
        Attribute::MpUnreach {
            afi,
            safi,
            withdrawn,
        } => {
            value.extend_from_slice(&afi.to_be_bytes());
            value.push(*safi);
            for p in withdrawn {
                put_prefix(&mut value, *p);
            }
        }
        Attribute::Other { value: v, .. } => value.extend_from_slice(v),
    }
    let flags = match a {
        Attribute::Other { flags, .. } => *flags & !FLAG_EXTENDED,
        _ => well_known_flags(a.code()).unwrap_or(FLAG_OPTIONAL),
    };
    if value.len() > 255 {
        out.push(flags | FLAG_EXTENDED);
        out.push(a.code());
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    } else {
        out.push(flags);
        out.push(a.code());
        out.push(value.len() as u8);
    }
    out.extend_from_slice(&value);
}

/// Encodes a message. The caller keeps UPDATEs within [`MAX_MESSAGE_LEN`] (see
/// [`update_overhead`]); the length field is only correct below it.
pub fn encode(msg: &Message, ctx: Context) -> Vec<u8> {
    let mut out = vec![0xff; 16];
    out.extend_from_slice(&[0, 0]);
    match msg {
        Message::Open(o) => {
            out.push(TYPE_OPEN);
            out.push(o.version);
            out.extend_from_slice(&o.my_as.to_be_bytes());
            out.extend_from_slice(&o.hold_time.to_be_bytes());
            out.extend_from_slice(&o.router_id.octets());
            let mut caps = Vec::new();
            for c in &o.capabilities {
                match c {
                    Capability::Multiprotocol { afi, safi } => {
                        caps.extend_from_slice(&[CAP_MULTIPROTOCOL, 4]);
                        caps.extend_from_slice(&afi.to_be_bytes());
                        caps.extend_from_slice(&[0, *safi]);
                    }
                    Capability::RouteRefresh => caps.extend_from_slice(&[CAP_ROUTE_REFRESH, 0]),
                    Capability::FourOctetAs(asn) => {
                        caps.extend_from_slice(&[CAP_FOUR_OCTET_AS, 4]);
                        caps.extend_from_slice(&asn.to_be_bytes());
                    }
                    Capability::Other { code, value } => {
                        caps.push(*code);
                        caps.push(value.len() as u8);
                        caps.extend_from_slice(value);
                    }
                }
            }
            if caps.is_empty() {
                out.push(0);
            } else {
                out.push((caps.len() + 2) as u8);
                out.push(PARAM_CAPABILITIES);
                out.push(caps.len() as u8);
                out.extend_from_slice(&caps);
            }
        }
        Message::Update(u) => {
            out.push(TYPE_UPDATE);
            let mut w = Vec::new();
            for p in &u.withdrawn {
                put_prefix(&mut w, IpNet::V4(*p));
            }
            out.extend_from_slice(&(w.len() as u16).to_be_bytes());
            out.extend_from_slice(&w);
            let mut attrs = Vec::new();
            for a in &u.attributes {
                encode_attribute(&mut attrs, a, ctx);
            }
            out.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
            out.extend_from_slice(&attrs);
            for p in &u.nlri {
                put_prefix(&mut out, IpNet::V4(*p));
            }
        }
        Message::Notification(n) => {
            out.push(TYPE_NOTIFICATION);
            out.push(n.code);
            out.push(n.subcode);
            out.extend_from_slice(&n.data);
        }
        Message::Keepalive => out.push(TYPE_KEEPALIVE),
        Message::RouteRefresh { afi, safi } => {
            out.push(TYPE_ROUTE_REFRESH);
            out.extend_from_slice(&afi.to_be_bytes());
            out.push(0);
            out.push(*safi);
        }
    }
    let len = out.len().min(usize::from(u16::MAX)) as u16;
    out[16..18].copy_from_slice(&len.to_be_bytes());
    out
}

/// The size of an UPDATE carrying `attributes` and no prefixes: what is left of
/// [`MAX_MESSAGE_LEN`] is room for NLRI.
pub fn update_overhead(attributes: &[Attribute], ctx: Context) -> usize {
    let mut attrs = Vec::new();
    for a in attributes {
        encode_attribute(&mut attrs, a, ctx);
    }
    HEADER_LEN + 4 + attrs.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*: the same sequence for the same seed everywhere.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    fn v4(r: &mut Rng) -> Ipv4Net {
        Ipv4Net::new(Ipv4Addr::from(r.next() as u32), r.below(33) as u8)
            .unwrap()
            .trunc()
    }

    fn v6(r: &mut Rng) -> Ipv6Net {
        let a = (u128::from(r.next()) << 64) | u128::from(r.next());
        Ipv6Net::new(Ipv6Addr::from(a), r.below(129) as u8)
            .unwrap()
            .trunc()
    }

    fn segments(r: &mut Rng, four: bool) -> Vec<Segment> {
        (0..r.below(3))
            .map(|_| Segment {
                kind: 1 + r.below(2) as u8,
                asns: (0..1 + r.below(5))
                    .map(|_| {
                        if four {
                            r.next() as u32
                        } else {
                            u32::from(r.next() as u16)
                        }
                    })
                    .collect(),
            })
            .collect()
    }

    /// A random valid message (what a peer may send, within the limits of one message).
    fn random_message(r: &mut Rng, ctx: Context) -> Message {
        match r.below(5) {
            0 => Message::Open(Open {
                version: 4,
                my_as: r.next() as u16,
                hold_time: r.next() as u16,
                router_id: Ipv4Addr::from(r.next() as u32),
                capabilities: (0..r.below(6))
                    .map(|_| match r.below(4) {
                        0 => Capability::Multiprotocol {
                            afi: 1 + r.below(2) as u16,
                            safi: 1,
                        },
                        1 => Capability::RouteRefresh,
                        2 => Capability::FourOctetAs(r.next() as u32),
                        _ => Capability::Other {
                            code: 70 + r.below(100) as u8,
                            value: {
                                let n = r.below(8);
                                r.bytes(n)
                            },
                        },
                    })
                    .collect(),
            }),
            1 => {
                let mut attributes = Vec::new();
                let mut kinds: Vec<usize> = (0..10).collect();
                // A random subset, each attribute at most once, in random order.
                for _ in 0..r.below(8) {
                    let k = kinds.remove(r.below(kinds.len()));
                    let four = ctx.four_octet_as;
                    attributes.push(match k {
                        0 => Attribute::Origin(r.below(3) as u8),
                        1 => Attribute::AsPath(segments(r, four)),
                        2 => Attribute::NextHop(Ipv4Addr::from(r.next() as u32)),
                        3 => Attribute::Med(r.next() as u32),
                        4 => Attribute::LocalPref(r.next() as u32),
                        5 => Attribute::Communities(
                            (0..r.below(70)).map(|_| r.next() as u32).collect(),
                        ),
                        6 => Attribute::MpReach {
                            afi: AFI_IPV6,
                            safi: SAFI_UNICAST,
                            next_hop: {
                                let n = if r.below(2) == 0 { 16 } else { 32 };
                                r.bytes(n)
                            },
                            nlri: (0..r.below(20)).map(|_| IpNet::V6(v6(r))).collect(),
                        },
                        7 => Attribute::MpUnreach {
                            afi: AFI_IPV6,
                            safi: SAFI_UNICAST,
                            withdrawn: (0..r.below(20)).map(|_| IpNet::V6(v6(r))).collect(),
                        },
                        8 => Attribute::As4Path(segments(r, true)),
                        _ => Attribute::Other {
                            flags: FLAG_OPTIONAL | FLAG_TRANSITIVE,
                            code: 32 + r.below(200) as u8,
                            value: {
                                let n = r.below(300);
                                r.bytes(n)
                            },
                        },
                    });
                }
                Message::Update(Update {
                    withdrawn: (0..r.below(50)).map(|_| v4(r)).collect(),
                    attributes,
                    nlri: (0..r.below(50)).map(|_| v4(r)).collect(),
                })
            }
            2 => Message::Notification(Notification {
                code: r.next() as u8,
                subcode: r.next() as u8,
                data: {
                    let n = r.below(20);
                    r.bytes(n)
                },
            }),
            3 => Message::Keepalive,
            _ => Message::RouteRefresh {
                afi: r.next() as u16,
                safi: r.next() as u8,
            },
        }
    }

    /// Decodes `bytes` (any content) and, when accepted, checks the message encodes back to
    /// itself. Must never panic.
    fn check(bytes: &[u8], ctx: Context) -> bool {
        let Ok(len) = message_len(bytes) else {
            return false;
        };
        let Some(msg) = bytes.get(..len) else {
            return false;
        };
        match decode(msg, ctx) {
            Ok(m) => {
                let again = encode(&m, ctx);
                assert_eq!(decode(&again, ctx), Ok(m.clone()), "round trip of {m:?}");
                true
            }
            Err(_) => false,
        }
    }

    /// Valid messages round-trip exactly; mutated and random ones never panic the decoder (and
    /// whatever it accepts round-trips). 300k inputs, deterministic seeds.
    #[test]
    fn fuzz_decode_never_panics_and_round_trips() {
        let mut r = Rng(0x5eed_b9b0_0000_0001);
        let (mut valid, mut accepted_mutants) = (0, 0);
        for i in 0..100_000 {
            let ctx = Context {
                four_octet_as: i % 2 == 0,
            };
            let m = random_message(&mut r, ctx);
            let bytes = encode(&m, ctx);
            if bytes.len() <= MAX_MESSAGE_LEN {
                assert_eq!(decode(&bytes, ctx), Ok(m.clone()), "valid {m:?}");
                valid += 1;
            }
            // Mutations: flipped bytes, cuts, inserted bytes, lying length fields.
            let mut bad = bytes.clone();
            for _ in 0..1 + r.below(4) {
                match r.below(4) {
                    0 if !bad.is_empty() => {
                        let at = r.below(bad.len());
                        bad[at] ^= 1 << r.below(8);
                    }
                    1 if !bad.is_empty() => {
                        let keep = r.below(bad.len());
                        bad.truncate(keep);
                    }
                    2 => {
                        let at = r.below(bad.len() + 1);
                        bad.insert(at, r.next() as u8);
                    }
                    _ if bad.len() > HEADER_LEN => {
                        // Point an inner length at random: the commonest parser bug.
                        let at = HEADER_LEN + r.below(bad.len() - HEADER_LEN);
                        bad[at] = r.next() as u8;
                    }
                    _ => {}
                }
            }
            if bad.len() >= 18 {
                let len = (bad.len().min(MAX_MESSAGE_LEN) as u16).to_be_bytes();
                bad[16..18].copy_from_slice(&len);
            }
            if check(&bad, ctx) {
                accepted_mutants += 1;
            }
            // Pure noise behind a valid header.
            let n = r.below(200);
            let mut noise = vec![0xff; 16];
            noise.extend_from_slice(&((HEADER_LEN + n) as u16).to_be_bytes());
            noise.push(1 + r.below(5) as u8);
            noise.extend(r.bytes(n));
            check(&noise, ctx);
        }
        assert!(valid > 90_000, "only {valid} valid messages fit 4096 bytes");
        // The mutants must reach deep into the decoder, not die at the header.
        assert!(accepted_mutants > 1_000, "{accepted_mutants}");
    }

    /// LOCAL_PREF (type 5, well-known: flags 0x40) and COMMUNITIES (type 8, optional
    /// transitive: flags 0xc0) as RFC 4271 and RFC 1997 lay them out.
    #[test]
    fn known_bytes_of_local_pref_and_communities() {
        let ctx = Context {
            four_octet_as: true,
        };
        let update = Message::Update(Update {
            withdrawn: Vec::new(),
            attributes: vec![
                Attribute::LocalPref(200),
                Attribute::Communities(vec![(64512 << 16) | 100, GRACEFUL_SHUTDOWN]),
            ],
            nlri: vec!["203.0.113.7/32".parse().unwrap()],
        });
        let bytes = encode(&update, ctx);
        assert_eq!(
            &bytes[19..],
            &[
                0, 0, // no withdrawn routes
                0, 18, // path attributes: 7 + 11 bytes
                0x40, 5, 4, 0, 0, 0, 200, // LOCAL_PREF 200
                0xc0, 8, 8, 0xfc, 0x00, 0, 100, 0xff, 0xff, 0, 0, // 64512:100, 65535:0
                32, 203, 0, 113, 7, // NLRI
            ]
        );
        let Ok(decoded) = decode(&bytes, ctx) else {
            panic!("update")
        };
        assert_eq!(decoded, update);
    }

    #[test]
    fn known_bytes_of_a_keepalive_and_an_open() {
        let ctx = Context {
            four_octet_as: true,
        };
        let ka = encode(&Message::Keepalive, ctx);
        assert_eq!(ka.len(), 19);
        assert_eq!(&ka[16..], &[0, 19, 4]);
        let open = Message::Open(Open {
            version: 4,
            my_as: AS_TRANS,
            hold_time: 3,
            router_id: Ipv4Addr::new(192, 0, 2, 1),
            capabilities: vec![
                Capability::FourOctetAs(4_200_000_000),
                Capability::RouteRefresh,
            ],
        });
        let bytes = encode(&open, ctx);
        assert_eq!(
            &bytes[18..],
            &[
                1, 4, 0x5b, 0xa0, 0, 3, 192, 0, 2, 1, 10, 2, 8, 65, 4, 0xfa, 0x56, 0xea, 0, 2, 0
            ]
        );
        let Ok(Message::Open(o)) = decode(&bytes, ctx) else {
            panic!("open")
        };
        assert_eq!(o.asn(), 4_200_000_000);
    }

    #[test]
    fn bad_header_and_lengths_name_the_notification() {
        let ctx = Context {
            four_octet_as: true,
        };
        let mut ka = encode(&Message::Keepalive, ctx);
        ka[3] = 0;
        assert_eq!(decode(&ka, ctx).unwrap_err().code, code::HEADER);
        let mut ka = encode(&Message::Keepalive, ctx);
        ka.push(0);
        ka[17] = 20;
        let e = decode(&ka, ctx).unwrap_err();
        assert_eq!((e.code, e.subcode), (code::HEADER, 2));
        // A /33 in the NLRI.
        let mut u = encode(&Message::Update(Update::default()), ctx);
        u.extend_from_slice(&[33, 1, 2, 3, 4, 5]);
        let len = u.len() as u16;
        u[16..18].copy_from_slice(&len.to_be_bytes());
        let e = decode(&u, ctx).unwrap_err();
        assert_eq!((e.code, e.subcode), (code::UPDATE, 10));
    }
}
