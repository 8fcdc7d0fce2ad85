//! 802.1Q with real packets (issue 29): this kernel has no 8021q, so no VLAN device exists; the
//! client writes tagged frames itself (an AF_PACKET socket, python3) and the lab's bridge carries
//! them as they are. `sluice run` on the lb's veth (native XDP) balances a tagged SYN to the VIP;
//! a capture on the backend shows the frame arrived with its tag (VLAN id and priority) and the
//! backend's MAC, from the lb's. Run under the lab lock:
//! `flock /tmp/sluice-lab.lock cargo test -p sluice-tests --test vlan_lab -- --nocapture`.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use sluice_tests::lab::{BackendSpec, HTTP_PORT, Lab, LabConfig, require_root};

/// Priority 5, VLAN 100.
const TCI: u16 = 0xa064;

/// Sends `count` copies of a tagged TCP SYN (client -> VIP:80, IPv4 header checksum right) out
/// of the client's eth0 through a raw packet socket.
const SEND_TAGGED_SYN: &str = r#"
import socket, struct, sys
dst, src, tci, saddr, daddr, dport, count = sys.argv[1:8]
mac = lambda m: bytes.fromhex(m.replace(":", ""))
ip = lambda a: socket.inet_aton(a)
tcp = struct.pack("!HHIIBBHHH", 40000, int(dport), 1, 0, 5 << 4, 0x02, 64240, 0, 0)
hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, ip(saddr), ip(daddr))
s = sum(struct.unpack("!10H", hdr))
s = (s & 0xffff) + (s >> 16)
s = (s & 0xffff) + (s >> 16)
hdr = hdr[:10] + struct.pack("!H", ~s & 0xffff) + hdr[12:]
frame = mac(dst) + mac(src) + struct.pack("!HHH", 0x8100, int(tci), 0x0800) + hdr + tcp
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
sock.bind(("eth0", 0))
for _ in range(int(count)):
    sock.send(frame)
"#;

#[test]
fn tagged_syn_reaches_the_backend_with_its_tag() -> Result<()> {
    require_root();
    let lab = Lab::build(LabConfig {
        backends: 1,
        udp: false,
    })
    .context("building the lab")?;
    // The bridge takes a tag off into the packet's metadata on receive; with transmit VLAN
    // offload off, its ports put it back into the frame, so the lb's XDP and the backend's
    // veth see the tag in the frame, as a VLAN's frames on a NIC without receive offload.
    for port in [lab.client_peer_iface(), lab.lb_peer_iface(), "sw-b0"] {
        lab.exec_ok(lab.switch_ns(), &["ethtool", "-K", port, "txvlan", "off"])?;
    }
    let _sluice = lab.run_sluice(&[BackendSpec::active(0)], Duration::from_secs(30))?;

    let backend_mac = lab.backend_macs()[0].clone();
    let mut capture = Command::new("ip")
        .args(["netns", "exec", lab.backend_ns(0)])
        .args(["timeout", "20", "tcpdump", "-i", "eth0", "-e", "-nn", "-l"])
        .args([
            "--immediate-mode",
            "-c",
            "1",
            "vlan 100 and tcp dst port 80",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting tcpdump in the backend")?;
    // tcpdump says "listening on eth0" once its filter is in place.
    let mut stderr = BufReader::new(capture.stderr.take().context("tcpdump stderr")?);
    let mut line = String::new();
    while !line.contains("listening on") {
        line.clear();
        ensure!(
            stderr.read_line(&mut line)? > 0,
            "tcpdump ended before listening"
        );
    }

    let (vip, client) = (lab.vip().to_string(), lab.client_addr().to_string());
    let (lb_mac, client_mac) = (lab.lb_mac(), lab.client_mac());
    let (tci, port) = (TCI.to_string(), HTTP_PORT.to_string());
    lab.exec_ok(
        lab.client_ns(),
        &[
            "python3",
            "-c",
            SEND_TAGGED_SYN,
            &lb_mac,
            &client_mac,
            &tci,
            &client,
            &vip,
            &port,
            "3",
        ],
    )?;
    let out = capture.wait_with_output().context("waiting for tcpdump")?;
    let seen = String::from_utf8_lossy(&out.stdout);
    println!("backend b0 ({backend_mac}) captured: {seen}");
    ensure!(out.status.success(), "no tagged SYN reached b0: {seen:?}");
    // e.g. "<lb> > <b0>, ethertype 802.1Q (0x8100), length 58: vlan 100, p 5, ethertype IPv4
    // (0x0800), <client>.40000 > <vip>.80: Flags [S], ..."
    ensure!(
        seen.contains(&format!("{lb_mac} > {backend_mac}, ethertype 802.1Q")),
        "from the lb's MAC to b0's, tagged: {seen:?}"
    );
    ensure!(
        seen.contains("vlan 100, p 5, ethertype IPv4"),
        "VLAN 100 priority 5 kept: {seen:?}"
    );
    ensure!(
        seen.contains(&format!("{client}.40000 > {vip}.80: Flags [S]")),
        "the client's SYN to the VIP, untouched: {seen:?}"
    );
    Ok(())
}
