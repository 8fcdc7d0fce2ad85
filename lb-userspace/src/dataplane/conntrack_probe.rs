//! Does netfilter conntrack track this node's connections? Second chance needs it: the pick
//! asks its conntrack whether a flow began there. Where nothing in the node's namespace uses
//! conntrack (a CNI that replaced kube-proxy, a bare server), every lookup misses, and the
//! pick would hand on every mid-flow packet whose previous pick differs, its own connections'
//! too (reset there). So the agent asks the way the dataplane will: it opens a TCP connection
//! to itself over loopback and runs the balancer object's `sluice_conntrack_probe` (the same
//! `bpf_xdp_ct_lookup`) on its 5-tuple, in its own namespace (BPF_PROG_TEST_RUN asks the
//! caller's). `flow_state: auto` follows the answer.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context, anyhow};
use aya::Ebpf;
use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{CONNTRACK_PROBE_PROGRAM, FlowKey, IPPROTO_TCP, raw_addr};

use super::xdp_program;

/// XDP verdicts of the probe (the kernel's values).
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
/// A connect over loopback either succeeds at once or not at all.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether conntrack in the caller's namespace knows a loopback TCP connection opened for the
/// question (both ends in this process, closed on return).
pub fn conntrack_tracks(ebpf: &mut Ebpf) -> anyhow::Result<bool> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("conntrack probe: listening on loopback")?;
    let server = listener.local_addr()?;
    let client = TcpStream::connect_timeout(&server, CONNECT_TIMEOUT)
        .with_context(|| format!("conntrack probe: connecting to {server}"))?;
    let (_accepted, _) = listener
        .accept()
        .context("conntrack probe: accepting its own connection")?;
    let frame = key_bytes(&flow_key(client.local_addr()?, server));
    let prog = xdp_program(ebpf, CONNTRACK_PROBE_PROGRAM)?;
    let mut out = vec![0u8; frame.len()];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&frame);
    opts.data_out = Some(&mut out);
    opts.repeat = 1;
    let result = prog
        .test_run(opts)
        .map_err(|e| anyhow!("conntrack probe: BPF_PROG_TEST_RUN: {e}"))?;
    match result.return_value {
        XDP_PASS => Ok(true),
        XDP_DROP => Ok(false),
        other => Err(anyhow!("conntrack probe: unexpected verdict {other}")),
    }
}

/// The TCP flow `client` -> `server` as the dataplane keys it (addresses and ports in network
/// order).
fn flow_key(client: SocketAddr, server: SocketAddr) -> FlowKey {
    let (src, family) = raw_addr(client.ip());
    let (dst, _) = raw_addr(server.ip());
    FlowKey {
        src,
        dst,
        sport: client.port().to_be(),
        dport: server.port().to_be(),
        proto: IPPROTO_TCP,
        family,
        _pad: [0; 2],
    }
}

/// The key's bytes, as the probe reads them from its frame.
fn key_bytes(key: &FlowKey) -> Vec<u8> {
    // SAFETY: `FlowKey` is `repr(C)` plain data with its padding spelled out (`_pad`): every
    // byte of it is initialised.
    unsafe {
        std::slice::from_raw_parts((key as *const FlowKey).cast::<u8>(), size_of::<FlowKey>())
    }
    .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_in_network_order_where_the_dataplane_reads_it() {
        let key = flow_key(
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.2:80".parse().unwrap(),
        );
        let bytes = key_bytes(&key);
        assert_eq!(bytes.len(), 40);
        assert_eq!(bytes[..4], [127, 0, 0, 1]);
        assert_eq!(bytes[16..20], [127, 0, 0, 2]);
        assert_eq!(bytes[32..34], 40000u16.to_be_bytes());
        assert_eq!(bytes[34..36], 80u16.to_be_bytes());
        assert_eq!((bytes[36], bytes[37]), (IPPROTO_TCP, lb_common::FAMILY_V4));
    }
}
