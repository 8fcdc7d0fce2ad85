//! The session's TCP socket, set up before it connects: the source address, the TCP-MD5 key
//! (RFC 2385: the kernel signs every segment and drops the peer's unsigned or wrongly signed
//! ones, SYNs included, so a password mismatch looks like a peer that never answers) and
//! the TTL rules (eBGP multihop; GTSM, RFC 5082).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd as _, RawFd};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

use super::Peer;
use super::bfd::set_int_opt;

/// The longest key `TCP_MD5SIG` takes (`TCP_MD5SIG_MAXKEYLEN`).
pub const MD5_MAX_KEY_LEN: usize = 80;

/// Why a connection could not be opened, with the words for the log and `/metrics`.
pub struct ConnectError {
    pub reason: super::metrics::Reason,
    pub text: String,
}

/// Connects to `peer` with its source address, password and TTL rules.
pub async fn connect(peer: &Peer, wait: Duration) -> Result<TcpStream, ConnectError> {
    use super::metrics::Reason;
    let target = SocketAddr::new(peer.addr, peer.port);
    let setup = |e: io::Error, what: &str| ConnectError {
        reason: Reason::SocketSetup,
        text: format!("connecting to {target}: {what}: {e}"),
    };
    let socket = match peer.addr {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| setup(e, "a socket"))?;
    if let Some(source) = peer.options.source {
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|e| setup(e, &format!("binding source address {source}")))?;
    }
    let fd = socket.as_raw_fd();
    if let Some(password) = &peer.options.password {
        set_md5_key(fd, peer.addr, password.bytes()).map_err(|e| {
            setup(
                e,
                "setting the TCP-MD5 key (TCP_MD5SIG; a kernel without CONFIG_TCP_MD5SIG refuses it)",
            )
        })?;
    }
    if let Some(hops) = peer.options.ttl_security_hops {
        set_ttl(fd, peer.addr, 255).map_err(|e| setup(e, "TTL 255 (TTL security)"))?;
        set_min_ttl(fd, peer.addr, 256 - i32::from(hops))
            .map_err(|e| setup(e, "the minimum TTL (TTL security)"))?;
    } else if let Some(hops) = peer.options.ebgp_multihop {
        set_ttl(fd, peer.addr, i32::from(hops)).map_err(|e| setup(e, "the eBGP multihop TTL"))?;
    }
    let md5_hint = if peer.options.password.is_some() {
        " (TCP-MD5 is on for this peer: a router with another password, or none, drops our \
         signed SYNs without an answer, and we drop its unsigned replies)"
    } else {
        ""
    };
    match timeout(wait, socket.connect(target)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(ConnectError {
            reason: if e.kind() == io::ErrorKind::ConnectionRefused {
                Reason::ConnectRefused
            } else {
                Reason::ConnectFailed
            },
            text: format!("connecting to {target}: {e}"),
        }),
        Err(_) => Err(ConnectError {
            reason: if peer.options.password.is_some() {
                Reason::NoAnswerWithMd5
            } else {
                Reason::NoAnswer
            },
            text: format!("connecting to {target}: no answer in {wait:?}{md5_hint}"),
        }),
    }
}

/// `struct tcp_md5sig` of linux/tcp.h (libc has the constant, not the struct).
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefix_len: u8,
    key_len: u16,
    ifindex: libc::c_int,
    key: [u8; MD5_MAX_KEY_LEN],
}

/// Signs the segments to and from `peer` with `key` (one key per peer address).
fn set_md5_key(fd: RawFd, peer: IpAddr, key: &[u8]) -> io::Result<()> {
    if key.len() > MD5_MAX_KEY_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "TCP-MD5 key longer than 80 bytes",
        ));
    }
    // SAFETY: all-zero is a valid value of this plain C struct.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    match peer {
        IpAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write((&raw mut sig.addr).cast::<libc::sockaddr_in>(), sin) };
        }
        IpAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut sig.addr).cast::<libc::sockaddr_in6>(), sin6) };
        }
    }
    sig.key_len = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: setsockopt with a pointer to a live struct of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            (&raw const sig).cast(),
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_ttl(fd: RawFd, peer: IpAddr, ttl: i32) -> io::Result<()> {
    match peer {
        IpAddr::V4(_) => set_int_opt(fd, libc::IPPROTO_IP, libc::IP_TTL, ttl),
        IpAddr::V6(_) => set_int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, ttl),
    }
}

/// The kernel drops the peer's packets that arrive with a smaller TTL (hop limit).
fn set_min_ttl(fd: RawFd, peer: IpAddr, min: i32) -> io::Result<()> {
    match peer {
        IpAddr::V4(_) => set_int_opt(fd, libc::IPPROTO_IP, libc::IP_MINTTL, min),
        IpAddr::V6(_) => set_int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_MINHOPCOUNT, min),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Password, PeerOptions};
    use super::*;

    /// A loopback listener that signs with `key` (as a router with `neighbor X password`).
    fn md5_listener(key: &[u8]) -> tokio::net::TcpListener {
        let socket = TcpSocket::new_v4().unwrap();
        set_md5_key(socket.as_raw_fd(), "127.0.0.1".parse().unwrap(), key).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        socket.listen(8).unwrap()
    }

    fn peer(port: u16, password: Option<&str>) -> Peer {
        let mut p = Peer::new("127.0.0.1".parse().unwrap(), port, 65000);
        p.options = PeerOptions {
            password: password.map(|t| Password::new(t).unwrap()),
            ..PeerOptions::default()
        };
        p
    }

    /// The kernel checks the key: the right one connects; a wrong one or none gets no answer
    /// at all (the listener drops the SYN), which the error names as a likely mismatch.
    #[tokio::test]
    async fn tcp_md5_connects_only_with_the_right_key() {
        let listener = md5_listener(b"s3cret");
        let port = listener.local_addr().unwrap().port();
        let ok = connect(&peer(port, Some("s3cret")), Duration::from_secs(5)).await;
        assert!(
            ok.is_ok(),
            "{}",
            ok.err().map(|e| e.text).unwrap_or_default()
        );
        let wrong = connect(&peer(port, Some("other")), Duration::from_millis(700))
            .await
            .expect_err("a wrong key connected");
        assert_eq!(wrong.reason, super::super::metrics::Reason::NoAnswerWithMd5);
        assert!(wrong.text.contains("TCP-MD5"), "{}", wrong.text);
        let none = connect(&peer(port, None), Duration::from_millis(700))
            .await
            .expect_err("no key connected");
        assert_eq!(none.reason, super::super::metrics::Reason::NoAnswer);
    }

    /// GTSM: a peer that sends with TTL 255 connects; one that sends with the default TTL
    /// (64) is dropped by the kernel (its SYN-ACK never arrives).
    #[tokio::test]
    async fn ttl_security_accepts_only_ttl_255() {
        let listener = |ttl: Option<i32>| {
            let socket = TcpSocket::new_v4().unwrap();
            if let Some(ttl) = ttl {
                set_ttl(socket.as_raw_fd(), "127.0.0.1".parse().unwrap(), ttl).unwrap();
            }
            socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            socket.listen(8).unwrap()
        };
        let gtsm = |port: u16| {
            let mut p = Peer::new("127.0.0.1".parse().unwrap(), port, 65000);
            p.options.ttl_security_hops = Some(1);
            p
        };
        let at_255 = listener(Some(255));
        let port = at_255.local_addr().unwrap().port();
        let ok = connect(&gtsm(port), Duration::from_secs(5)).await;
        assert!(
            ok.is_ok(),
            "{}",
            ok.err().map(|e| e.text).unwrap_or_default()
        );
        let at_64 = listener(None);
        let port = at_64.local_addr().unwrap().port();
        let far = connect(&gtsm(port), Duration::from_millis(700))
            .await
            .expect_err("a peer sending with TTL 64 got through TTL security");
        assert_eq!(far.reason, super::super::metrics::Reason::NoAnswer);
    }

    /// The source address and the eBGP multihop TTL are the connection's.
    #[tokio::test]
    async fn source_address_and_multihop_ttl_are_applied() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut peer = Peer::new("127.0.0.1".parse().unwrap(), port, 65000);
        peer.options.source = Some("127.0.0.2".parse().unwrap());
        peer.options.ebgp_multihop = Some(3);
        let stream = connect(&peer, Duration::from_secs(5))
            .await
            .map_err(|e| e.text)
            .unwrap();
        assert_eq!(stream.ttl().unwrap(), 3);
        let (_, from) = listener.accept().await.unwrap();
        assert_eq!(from.ip(), "127.0.0.2".parse::<IpAddr>().unwrap());
    }

    /// The struct the kernel reads has linux/tcp.h's layout (216 bytes, the key at 136).
    #[test]
    fn md5sig_layout_is_the_kernels() {
        assert_eq!(std::mem::size_of::<TcpMd5Sig>(), 216);
        assert_eq!(std::mem::offset_of!(TcpMd5Sig, key), 136);
        assert_eq!(std::mem::offset_of!(TcpMd5Sig, key_len), 130);
    }
}
