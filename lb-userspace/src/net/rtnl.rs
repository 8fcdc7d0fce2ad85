//! A small synchronous rtnetlink client: one `NETLINK_ROUTE` socket per call, blocking requests
//! (a get or a dump) and a lenient decoder that reads only the attributes sluice needs.
//!
//! Requests are built with `netlink-packet-route`'s message types. Replies are framed with
//! `netlink-packet-core` and decoded attribute by attribute: an attribute this code does not know,
//! or one a newer kernel encodes differently, is skipped instead of failing the whole lookup.
//!
//! The socket belongs to the network namespace of the thread that opens it, so every call opens
//! its own: a thread that moved into another namespace (the tests do) asks that namespace.

use std::{
    fmt, io,
    net::IpAddr,
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use netlink_packet_core::{
    Emitable as _, ErrorBuffer, NLM_F_CAPPED, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
    NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, NlaBuffer, NlasIterator, parse_ip, parse_string, parse_u32,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressHeader, AddressMessage},
    link::{LinkAttribute, LinkFlags, LinkHeader, LinkMessage},
    neighbour::{NeighbourHeader, NeighbourMessage},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

// Message types (linux/rtnetlink.h).
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_NEWROUTE: u16 = 24;
pub const RTM_NEWNEIGH: u16 = 28;

// Attribute kinds sluice reads (linux/if_link.h, if_addr.h, rtnetlink.h, neighbour.h).
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
const RTA_VIA: u16 = 18;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
/// The extended ack's human-readable message (linux/netlink.h, `NLMSGERR_ATTR_MSG`).
const NLMSGERR_ATTR_MSG: u16 = 1;

// Neighbour states (linux/neighbour.h).
#[cfg(test)]
pub const NUD_INCOMPLETE: u16 = 0x01;
pub const NUD_REACHABLE: u16 = 0x02;
pub const NUD_STALE: u16 = 0x04;
pub const NUD_DELAY: u16 = 0x08;
pub const NUD_PROBE: u16 = 0x10;
#[cfg(test)]
pub const NUD_FAILED: u16 = 0x20;
pub const NUD_NOARP: u16 = 0x40;
pub const NUD_PERMANENT: u16 = 0x80;

/// Address scopes (linux/rtnetlink.h, `RT_SCOPE_*`).
pub const RT_SCOPE_UNIVERSE: u8 = 0;
pub const RT_SCOPE_HOST: u8 = 254;

/// How long one request waits for the kernel's answer before giving up.
const ANSWER_TIMEOUT_SECS: u8 = 5;
const ANSWER_TIMEOUT: Duration = Duration::from_secs(ANSWER_TIMEOUT_SECS as u64);
/// A dump that the kernel marks inconsistent (the table changed under it) is asked again this
/// many times; the last answer is used whatever its mark.
const DUMP_TRIES: usize = 3;

/// What went wrong talking to the kernel: an errno from the socket or from the kernel's answer,
/// with the kernel's extended-ack message when it sent one, or an answer that does not decode.
#[derive(Debug)]
pub enum Error {
    Io(io::Error),
    Kernel { errno: i32, message: Option<String> },
    Decode(String),
}

impl Error {
    /// The errno, for callers that tell "not found" from other failures.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io(e) => e.raw_os_error(),
            Error::Kernel { errno, .. } => Some(*errno),
            Error::Decode(_) => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "netlink socket: {e}"),
            Error::Kernel { errno, message } => {
                write!(f, "{}", io::Error::from_raw_os_error(*errno))?;
                if let Some(m) = message {
                    write!(f, " ({m})")?;
                }
                Ok(())
            }
            Error::Decode(what) => write!(f, "undecodable netlink answer: {what}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// One inner message of an answer: its type and its payload (after the netlink header).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub kind: u16,
    pub payload: Vec<u8>,
}

/// Sends `request` (a get, or a dump with `dump`) and returns the kernel's messages.
pub fn request(request: RouteNetlinkMessage, dump: bool) -> Result<Vec<Reply>, Error> {
    let socket = open()?;
    let mut tries = 0;
    loop {
        tries += 1;
        let seq = tries as u32;
        send(&socket, request.clone(), dump, seq)?;
        let answer = receive(&socket, seq, dump)?;
        if !answer.interrupted || tries >= DUMP_TRIES {
            return Ok(answer.replies);
        }
    }
}

fn open() -> Result<Socket, Error> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    // Both only improve error reports (a reason text; no echo of our request): old kernels
    // without them still answer.
    let _ = socket.set_ext_ack(true);
    let _ = socket.set_cap_ack(true);
    let timeout = libc::timeval {
        // Not `as libc::time_t`: that alias is deprecated on musl (its width changes).
        tv_sec: ANSWER_TIMEOUT_SECS.into(),
        tv_usec: 0,
    };
    // SAFETY: setsockopt on a descriptor we own, with a timeval that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error().into());
    }
    Ok(socket)
}

fn send(socket: &Socket, request: RouteNetlinkMessage, dump: bool, seq: u32) -> Result<(), Error> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(request));
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    let sent = socket.send(&buf, 0)?;
    if sent != buf.len() {
        return Err(Error::Decode(format!(
            "the request was sent short ({sent} of {} bytes)",
            buf.len()
        )));
    }
    Ok(())
}

struct Answer {
    replies: Vec<Reply>,
    /// The kernel flagged the dump as interrupted (`NLM_F_DUMP_INTR`).
    interrupted: bool,
}

fn receive(socket: &Socket, seq: u32, dump: bool) -> Result<Answer, Error> {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut answer = Answer {
        replies: Vec::new(),
        interrupted: false,
    };
    loop {
        if Instant::now() > deadline {
            return Err(Error::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the kernel did not finish answering within {ANSWER_TIMEOUT:?}"),
            )));
        }
        let (datagram, _) = socket.recv_from_full().map_err(|e| {
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                Error::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the kernel did not answer within {ANSWER_TIMEOUT:?}"),
                ))
            } else {
                Error::Io(e)
            }
        })?;
        if parse_datagram(&datagram, seq, dump, &mut answer)? {
            return Ok(answer);
        }
    }
}

/// Adds the messages of one datagram that answer request `seq` to `answer`; true when the answer
/// is complete (a get's reply, a dump's `NLMSG_DONE`, or an acknowledgement).
fn parse_datagram(
    datagram: &[u8],
    seq: u32,
    dump: bool,
    answer: &mut Answer,
) -> Result<bool, Error> {
    let mut offset = 0;
    while offset < datagram.len() {
        let message = NetlinkBuffer::new_checked(&datagram[offset..])
            .map_err(|e| Error::Decode(format!("netlink header at byte {offset}: {e}")))?;
        let length = message.length() as usize;
        // Messages are 4-byte aligned; new_checked has made sure `length` covers the header.
        offset += length.div_ceil(4) * 4;
        if message.sequence_number() != seq {
            // An answer to an earlier try of a retried dump.
            continue;
        }
        if message.flags() & NLM_F_DUMP_INTR != 0 {
            answer.interrupted = true;
        }
        match message.message_type() {
            NLMSG_NOOP => {}
            NLMSG_DONE => {
                // A dump that failed part way ends with a negative errno here.
                let code = message
                    .payload()
                    .get(..4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map_or(0, i32::from_ne_bytes);
                if code < 0 {
                    return Err(Error::Kernel {
                        errno: code.saturating_abs(),
                        message: None,
                    });
                }
                return Ok(true);
            }
            NLMSG_OVERRUN => return Err(Error::Decode("the kernel reported an overrun".into())),
            NLMSG_ERROR => {
                return match kernel_error(message.payload(), message.flags())? {
                    None => Ok(true),
                    Some(e) => Err(e),
                };
            }
            kind => {
                answer.replies.push(Reply {
                    kind,
                    payload: message.payload().to_vec(),
                });
                if !dump {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

/// An `NLMSG_ERROR` payload: `None` for an acknowledgement, else the errno and the extended ack's
/// message.
fn kernel_error(payload: &[u8], flags: u16) -> Result<Option<Error>, Error> {
    let buffer = ErrorBuffer::new_checked(payload)
        .map_err(|e| Error::Decode(format!("error message: {e}")))?;
    let Some(code) = buffer.code() else {
        return Ok(None);
    };
    // After the code comes the request's header (and with it its payload unless capped), then
    // the extended ack's attributes.
    let echoed = &payload[4..];
    let skip = if flags & NLM_F_CAPPED != 0 {
        16
    } else {
        NetlinkBuffer::new_checked(echoed)
            .map(|h| (h.length() as usize).div_ceil(4) * 4)
            .unwrap_or(echoed.len())
    };
    let message = echoed.get(skip..).and_then(|tlvs| {
        NlasIterator::new(tlvs)
            .map_while(Result::ok)
            .find(|nla| nla.kind() == NLMSGERR_ATTR_MSG)
            .and_then(|nla| parse_string(nla.value()).ok())
            .map(|m| m.trim_end_matches('\0').to_owned())
            .filter(|m| !m.is_empty())
    });
    Ok(Some(Error::Kernel {
        errno: code.get().saturating_abs(),
        message,
    }))
}

/// The attributes after a fixed header of `header_len` bytes, as far as they decode.
fn attributes(payload: &[u8], header_len: usize) -> impl Iterator<Item = NlaBuffer<&[u8]>> {
    NlasIterator::new(payload.get(header_len..).unwrap_or_default()).map_while(Result::ok)
}

fn decode_error(what: &str, e: impl fmt::Display) -> Error {
    Error::Decode(format!("{what}: {e}"))
}

/// A link (`RTM_NEWLINK`), as far as sluice needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: Option<String>,
    /// The link-layer address (6 bytes on Ethernet).
    pub address: Option<Vec<u8>>,
    pub mtu: Option<u32>,
    /// Administratively up (`IFF_UP`) and with a carrier (`IFF_LOWER_UP`): it can pass frames.
    pub up: bool,
}

pub fn decode_link(payload: &[u8]) -> Result<Link, Error> {
    let header = LinkHeader::parse(payload).map_err(|e| decode_error("link header", e))?;
    let mut link = Link {
        index: header.index,
        name: None,
        address: None,
        mtu: None,
        up: header.flags.contains(LinkFlags::Up | LinkFlags::LowerUp),
    };
    for nla in attributes(payload, header.buffer_len()) {
        match nla.kind() {
            IFLA_IFNAME => link.name = parse_string(nla.value()).ok(),
            IFLA_ADDRESS => link.address = Some(nla.value().to_vec()),
            IFLA_MTU => link.mtu = parse_u32(nla.value()).ok(),
            _ => {}
        }
    }
    Ok(link)
}

/// An address (`RTM_NEWADDR`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub scope: u8,
    /// The local address (`IFA_LOCAL`, else `IFA_ADDRESS`, which on a point-to-point link is the
    /// peer's), as `ip addr` shows it.
    pub local: Option<IpAddr>,
}

pub fn decode_address(payload: &[u8]) -> Result<Address, Error> {
    let header = AddressHeader::parse(payload).map_err(|e| decode_error("address header", e))?;
    let (mut local, mut address) = (None, None);
    for nla in attributes(payload, header.buffer_len()) {
        match nla.kind() {
            IFA_LOCAL => local = parse_ip(nla.value()).ok(),
            IFA_ADDRESS => address = parse_ip(nla.value()).ok(),
            _ => {}
        }
    }
    Ok(Address {
        index: header.index,
        scope: header.scope.into(),
        local: local.or(address),
    })
}

/// A route (`RTM_NEWROUTE`), as `RTM_GETROUTE` for one destination answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    pub oif: Option<u32>,
    /// `RTA_GATEWAY`, or an `RTA_VIA` next hop of the other family (IPv4 over IPv6).
    pub gateway: Option<IpAddr>,
    pub prefsrc: Option<IpAddr>,
}

pub fn decode_route(payload: &[u8]) -> Result<RouteEntry, Error> {
    let header = RouteHeader::parse(payload).map_err(|e| decode_error("route header", e))?;
    let mut route = RouteEntry {
        oif: None,
        gateway: None,
        prefsrc: None,
    };
    for nla in attributes(payload, header.buffer_len()) {
        let value = nla.value();
        match nla.kind() {
            RTA_OIF => route.oif = parse_u32(value).ok(),
            RTA_GATEWAY => route.gateway = parse_ip(value).ok(),
            // struct rtvia: a 2-byte family, then the address.
            RTA_VIA if route.gateway.is_none() => {
                route.gateway = value.get(2..).and_then(|a| parse_ip(a).ok())
            }
            RTA_PREFSRC => route.prefsrc = parse_ip(value).ok(),
            _ => {}
        }
    }
    Ok(route)
}

/// A neighbour entry (`RTM_NEWNEIGH`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NeighbourEntry {
    pub ifindex: u32,
    /// `NUD_*` bits.
    pub state: u16,
    pub dst: Option<IpAddr>,
    pub lladdr: Option<Vec<u8>>,
}

pub fn decode_neighbour(payload: &[u8]) -> Result<NeighbourEntry, Error> {
    let header =
        NeighbourHeader::parse(payload).map_err(|e| decode_error("neighbour header", e))?;
    let mut entry = NeighbourEntry {
        ifindex: header.ifindex,
        state: header.state.into(),
        dst: None,
        lladdr: None,
    };
    for nla in attributes(payload, header.buffer_len()) {
        match nla.kind() {
            NDA_DST => entry.dst = parse_ip(nla.value()).ok(),
            NDA_LLADDR => entry.lladdr = Some(nla.value().to_vec()),
            _ => {}
        }
    }
    Ok(entry)
}

/// Decodes the replies of kind `kind` with `decode`, ignoring any other kind.
fn decode_all<T>(
    replies: Vec<Reply>,
    kind: u16,
    decode: fn(&[u8]) -> Result<T, Error>,
) -> Result<Vec<T>, Error> {
    replies
        .iter()
        .filter(|r| r.kind == kind)
        .map(|r| decode(&r.payload))
        .collect()
}

pub fn family_of(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

/// The link named `name` (`RTM_GETLINK` with `IFLA_IFNAME`).
pub fn link_by_name(name: &str) -> Result<Link, Error> {
    let mut message = LinkMessage::default();
    message
        .attributes
        .push(LinkAttribute::IfName(name.to_owned()));
    one(
        request(RouteNetlinkMessage::GetLink(message), false)?,
        RTM_NEWLINK,
        decode_link,
    )
}

/// The link with index `index`.
pub fn link_by_index(index: u32) -> Result<Link, Error> {
    let mut message = LinkMessage::default();
    message.header.index = index;
    one(
        request(RouteNetlinkMessage::GetLink(message), false)?,
        RTM_NEWLINK,
        decode_link,
    )
}

/// Every address of this network namespace, of `family` (`Unspec` for both).
pub fn addresses(family: AddressFamily) -> Result<Vec<Address>, Error> {
    let mut message = AddressMessage::default();
    message.header.family = family;
    let replies = request(RouteNetlinkMessage::GetAddress(message), true)?;
    decode_all(replies, RTM_NEWADDR, decode_address)
}

/// The kernel's route to `addr` (`RTM_GETROUTE` for a host destination, as `ip route get`).
pub fn route_get(addr: IpAddr) -> Result<RouteEntry, Error> {
    let mut message = RouteMessage::default();
    message.header.address_family = family_of(addr);
    let (prefix, dst) = match addr {
        IpAddr::V4(a) => (32, RouteAddress::Inet(a)),
        IpAddr::V6(a) => (128, RouteAddress::Inet6(a)),
    };
    message.header.destination_prefix_length = prefix;
    message.attributes.push(RouteAttribute::Destination(dst));
    one(
        request(RouteNetlinkMessage::GetRoute(message), false)?,
        RTM_NEWROUTE,
        decode_route,
    )
}

/// The neighbour table of `family`.
pub fn neighbours(family: AddressFamily) -> Result<Vec<NeighbourEntry>, Error> {
    let mut message = NeighbourMessage::default();
    message.header.family = family;
    let replies = request(RouteNetlinkMessage::GetNeighbour(message), true)?;
    decode_all(replies, RTM_NEWNEIGH, decode_neighbour)
}

fn one<T>(
    replies: Vec<Reply>,
    kind: u16,
    decode: fn(&[u8]) -> Result<T, Error>,
) -> Result<T, Error> {
    decode_all(replies, kind, decode)?
        .into_iter()
        .next()
        .ok_or_else(|| {
            Error::Decode(format!(
                "the kernel's answer holds no message of type {kind}"
            ))
        })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use netlink_packet_core::{DoneMessage, ErrorMessage, NLM_F_MULTIPART};
    use netlink_packet_route::{
        address::{AddressAttribute, AddressScope},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
        route::RouteVia,
    };

    use super::*;

    fn emit(message: &impl netlink_packet_core::Emitable) -> Vec<u8> {
        let mut buf = vec![0; message.buffer_len()];
        message.emit(&mut buf);
        buf
    }

    /// A whole netlink message carrying `payload`, as the kernel frames it.
    fn frame(payload: NetlinkPayload<RouteNetlinkMessage>, seq: u32, flags: u16) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        header.flags = flags;
        let mut message = NetlinkMessage::new(header, payload);
        message.finalize();
        let mut buf = vec![0; message.buffer_len()];
        message.serialize(&mut buf);
        buf
    }

    #[test]
    fn link_name_mac_and_mtu() {
        let mut message = LinkMessage::default();
        message.header.index = 7;
        message.header.flags = LinkFlags::Up | LinkFlags::LowerUp;
        message.attributes = vec![
            LinkAttribute::IfName("veth0".into()),
            LinkAttribute::Mtu(1500),
            LinkAttribute::Address(vec![2, 0x5c, 0, 0, 0, 1]),
            LinkAttribute::TxQueueLen(1000),
        ];
        let link = decode_link(&emit(&message)).unwrap();
        assert_eq!(
            link,
            Link {
                index: 7,
                name: Some("veth0".into()),
                address: Some(vec![2, 0x5c, 0, 0, 0, 1]),
                mtu: Some(1500),
                up: true,
            }
        );
        // Up without a carrier (a cable out, a veth whose peer is down) passes no frame.
        message.header.flags = LinkFlags::Up;
        assert!(!decode_link(&emit(&message)).unwrap().up);
    }

    #[test]
    fn address_prefers_local_and_keeps_scope() {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.index = 3;
        message.header.scope = AddressScope::Universe;
        message.header.prefix_len = 32;
        // A point-to-point address: IFA_ADDRESS is the peer, IFA_LOCAL ours.
        message.attributes = vec![
            AddressAttribute::Address(Ipv4Addr::new(10, 0, 0, 1).into()),
            AddressAttribute::Local(Ipv4Addr::new(10, 0, 0, 2).into()),
            AddressAttribute::Label("eth0".into()),
        ];
        let address = decode_address(&emit(&message)).unwrap();
        assert_eq!(address.index, 3);
        assert_eq!(address.scope, RT_SCOPE_UNIVERSE);
        assert_eq!(address.local, Some(Ipv4Addr::new(10, 0, 0, 2).into()));

        let mut v6 = AddressMessage::default();
        v6.header.family = AddressFamily::Inet6;
        v6.header.scope = AddressScope::Host;
        v6.attributes = vec![AddressAttribute::Address(Ipv6Addr::LOCALHOST.into())];
        let address = decode_address(&emit(&v6)).unwrap();
        assert_eq!(address.scope, RT_SCOPE_HOST);
        assert_eq!(address.local, Some(Ipv6Addr::LOCALHOST.into()));
    }

    #[test]
    fn route_gateway_device_and_source() {
        let mut message = RouteMessage::default();
        message.header.address_family = AddressFamily::Inet;
        message.header.destination_prefix_length = 32;
        message.attributes = vec![
            RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(10, 1, 0, 2))),
            RouteAttribute::Oif(4),
            RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(10, 0, 0, 1))),
            RouteAttribute::PrefSource(RouteAddress::Inet(Ipv4Addr::new(10, 0, 0, 2))),
            RouteAttribute::Uid(0),
        ];
        let route = decode_route(&emit(&message)).unwrap();
        assert_eq!(
            route,
            RouteEntry {
                oif: Some(4),
                gateway: Some(Ipv4Addr::new(10, 0, 0, 1).into()),
                prefsrc: Some(Ipv4Addr::new(10, 0, 0, 2).into()),
            }
        );

        // IPv4 through an IPv6 next hop (RFC 5549) names it in RTA_VIA.
        let mut via = RouteMessage::default();
        via.header.address_family = AddressFamily::Inet;
        let hop: Ipv6Addr = "fe80::1".parse().unwrap();
        via.attributes = vec![
            RouteAttribute::Oif(2),
            RouteAttribute::Via(RouteVia::Inet6(hop)),
        ];
        let route = decode_route(&emit(&via)).unwrap();
        assert_eq!(route.gateway, Some(hop.into()));
        assert_eq!(route.prefsrc, None);
    }

    #[test]
    fn neighbour_destination_lladdr_and_state() {
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Inet6;
        message.header.ifindex = 9;
        message.header.state = NeighbourState::Stale;
        let dst: Ipv6Addr = "fd00::12".parse().unwrap();
        message.attributes = vec![
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(dst)),
            NeighbourAttribute::LinkLayerAddress(vec![2, 0x5c, 0, 0, 0, 2]),
            NeighbourAttribute::Probes(1),
        ];
        let entry = decode_neighbour(&emit(&message)).unwrap();
        assert_eq!(
            entry,
            NeighbourEntry {
                ifindex: 9,
                state: NUD_STALE,
                dst: Some(dst.into()),
                lladdr: Some(vec![2, 0x5c, 0, 0, 0, 2]),
            }
        );
    }

    #[test]
    fn a_bad_attribute_ends_decoding_but_keeps_what_came_before() {
        let mut message = LinkMessage::default();
        message.header.index = 2;
        message.attributes = vec![LinkAttribute::IfName("eth0".into())];
        let mut bytes = emit(&message);
        // An attribute claiming 200 bytes in a 8-byte tail.
        bytes.extend_from_slice(&[200, 0, 99, 0, 1, 2, 3, 4]);
        let link = decode_link(&bytes).unwrap();
        assert_eq!(link.name.as_deref(), Some("eth0"));
        assert!(decode_link(&[1, 2]).is_err(), "a truncated header");
    }

    #[test]
    fn dump_datagrams_end_with_done() {
        let mut neighbour = NeighbourMessage::default();
        neighbour.header.family = AddressFamily::Inet;
        neighbour.header.state = NeighbourState::Reachable;
        let entry = frame(
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(neighbour.clone())),
            5,
            NLM_F_MULTIPART,
        );
        let stale = frame(
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(neighbour)),
            4,
            NLM_F_MULTIPART | NLM_F_DUMP_INTR,
        );
        let mut first = entry.clone();
        first.extend_from_slice(&stale);
        first.extend_from_slice(&entry);
        let mut answer = Answer {
            replies: Vec::new(),
            interrupted: false,
        };
        assert!(!parse_datagram(&first, 5, true, &mut answer).unwrap());
        assert_eq!(answer.replies.len(), 2, "the message of seq 4 is not ours");
        assert!(!answer.interrupted);
        assert!(answer.replies.iter().all(|r| r.kind == RTM_NEWNEIGH));
        let done = frame(
            NetlinkPayload::Done(DoneMessage::default()),
            5,
            NLM_F_MULTIPART,
        );
        assert!(parse_datagram(&done, 5, true, &mut answer).unwrap());
        assert_eq!(answer.replies.len(), 2);
    }

    #[test]
    fn kernel_errors_carry_errno_and_extended_ack() {
        let mut error = ErrorMessage::default();
        error.code = std::num::NonZeroI32::new(-libc::ENODEV);
        // The capped echo of our request's header, then NLMSGERR_ATTR_MSG.
        let mut echo = vec![0u8; 16];
        echo.extend_from_slice(&[11, 0, 1, 0]);
        echo.extend_from_slice(b"no dev\0\0");
        error.header = echo;
        let bytes = frame(NetlinkPayload::Error(error), 1, NLM_F_CAPPED);
        let mut answer = Answer {
            replies: Vec::new(),
            interrupted: false,
        };
        let e = parse_datagram(&bytes, 1, false, &mut answer).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENODEV));
        assert!(e.to_string().contains("(no dev)"), "{e}");

        let ack = frame(NetlinkPayload::Error(ErrorMessage::default()), 1, 0);
        assert!(parse_datagram(&ack, 1, false, &mut answer).unwrap());
    }

    #[test]
    fn a_get_ends_with_its_reply() {
        let reply = frame(
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(LinkMessage::default())),
            3,
            0,
        );
        let mut answer = Answer {
            replies: Vec::new(),
            interrupted: false,
        };
        assert!(parse_datagram(&reply, 3, false, &mut answer).unwrap());
        assert_eq!(answer.replies[0].kind, RTM_NEWLINK);
    }

    #[test]
    fn loopback_asked_over_a_real_socket() {
        // Every network namespace has lo at index 1; no privilege needed to read it.
        let lo = link_by_name("lo").unwrap();
        assert_eq!(lo.index, 1);
        assert_eq!(link_by_index(1).unwrap().name.as_deref(), Some("lo"));
        let e = link_by_name("nosuchif0").unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENODEV), "{e}");
    }
}
