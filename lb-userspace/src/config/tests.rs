//! The static config's tests: parsing, validation and the errors users see.

use super::*;
use lb_common::{DEFAULT_FLOW_TABLE_SIZE, MAX_BACKENDS, MAX_TABLES, MAX_VIPS};

use crate::model::{
    Backend, DEFAULT_WEIGHT, FlowState, ForwardingMode, MAX_WEIGHT, MacAddr, Protocol, Vip, VipAddr,
};

/// A config from its lines, so that a test's line numbers are its indices + 1.
fn yaml(lines: &[&str]) -> String {
    lines.join("\n") + "\n"
}

fn error(lines: &[&str]) -> ConfigError {
    match parse(&yaml(lines), "lab.yaml") {
        Ok(desired) => panic!("expected an error, parsed {desired:?}"),
        Err(error) => error,
    }
}

/// Asserts where an error points and that its one-line message names the file, line,
/// field and `needle`.
fn assert_error(lines: &[&str], line: usize, field: &str, needle: &str) {
    let error = error(lines);
    let message = error.to_string();
    println!("{message}");
    assert_eq!(
        (error.line(), error.field()),
        (Some(line), field),
        "{message}"
    );
    let prefix = if field.is_empty() {
        format!("lab.yaml:{line}: ")
    } else {
        format!("lab.yaml:{line}: {field}: ")
    };
    assert!(message.starts_with(&prefix), "{message}");
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    assert!(!message.contains('\n'), "{message}");
}

#[test]
fn a_key_spanning_lines_stays_on_the_message_line() {
    // Found by tests/tests/config_fuzz.rs: a flow-mapping key may hold a line break.
    let message = parse("{\nbad\n\nkey: 1}\n", "lab.yaml")
        .expect_err("unknown key")
        .to_string();
    assert!(
        message.starts_with("lab.yaml:2: bad\\nkey: unknown key"),
        "{message}"
    );
    assert!(!message.contains('\n'), "{message}");
}

/// One VIP with one backend, and `extra` lines spliced in after line `at` (1-based).
fn with(at: usize, extra: &[&'static str]) -> Vec<&'static str> {
    let mut lines = vec![
        "vips:",                       // 1
        "  - address: 10.200.0.10",    // 2
        "    port: 80",                // 3
        "    backends:",               // 4
        "      - address: 10.200.1.2", // 5
    ];
    lines.splice(at..at, extra.iter().copied());
    lines
}

fn backend(addr: [u8; 4], mac: Option<[u8; 6]>, weight: u32, drain: bool) -> Backend {
    Backend {
        addr: addr.into(),
        mac: mac.map(MacAddr),
        weight,
        drain,
    }
}

#[test]
fn full_config() {
    let text = yaml(&[
        "# lab",
        "maglev_table_size: 251",
        "flow_table_size: 4096",
        "vips:",
        "  - address: 10.200.0.10",
        "    port: 80",
        "    protocol: tcp",
        "    backends:",
        "      - address: 10.200.1.3",
        "        weight: 3",
        "      - address: 10.200.1.2",
        "        mac: 02:00:00:00:01:02",
        "        drain: true",
        "      - address: 10.200.1.4",
        "        mac: \"02-00-00-00-01-04\"",
        "        weight: 0",
        "  - address: 10.200.0.10",
        "    port: 53",
        "    protocol: UDP",
        "    backends: []",
        "  - {address: 10.200.0.9, port: 443, backends: [{address: 10.200.1.9}]}",
        "  - address: 10.200.0.10",
        "    port: 53",
        "    backends:",
    ]);
    let desired = parse(&text, "lab.yaml").unwrap();
    let key = |s: &str| s.parse::<VipAddr>().unwrap();
    let expected = Desired {
        settings: Settings {
            maglev_table_size: Some(251),
            flow_table_size: 4096,
            ..Settings::default()
        },
        vips: vec![
            Vip::new(
                key("10.200.0.9:443/tcp"),
                vec![backend([10, 200, 1, 9], None, 1, false)],
            ),
            Vip::new(key("10.200.0.10:53/tcp"), vec![]),
            Vip::new(key("10.200.0.10:53/udp"), vec![]),
            Vip::new(
                key("10.200.0.10:80/tcp"),
                vec![
                    backend([10, 200, 1, 2], Some([2, 0, 0, 0, 1, 2]), 1, true),
                    backend([10, 200, 1, 3], None, 3, false),
                    backend([10, 200, 1, 4], Some([2, 0, 0, 0, 1, 4]), 0, false),
                ],
            ),
        ],
        peers: Default::default(),
    };
    assert_eq!(desired, expected);
}

#[test]
fn defaults() {
    let desired = parse(&yaml(&with(5, &[])), "lab.yaml").unwrap();
    assert_eq!(desired.settings, Settings::default());
    assert_eq!(desired.settings.maglev_table_size, None);
    assert_eq!(desired.settings.flow_table_size, DEFAULT_FLOW_TABLE_SIZE);
    let vip = &desired.vips[0];
    assert_eq!(vip.key.protocol, Protocol::Tcp);
    assert_eq!(
        vip.backends[..],
        [backend([10, 200, 1, 2], None, DEFAULT_WEIGHT, false)]
    );
    // Empty values are absent ones.
    let empty = parse(
        &yaml(&with(
            5,
            &["        mac:", "        weight: ~", "        drain: null"],
        )),
        "x",
    )
    .unwrap();
    assert_eq!(empty, desired);
}

#[test]
fn flow_state_is_table_unless_set_to_second_chance() {
    let table = parse(&yaml(&["vips: []"]), "lab.yaml").unwrap();
    assert_eq!(table.settings.flow_state, FlowState::Table);
    let auto = parse(&yaml(&["flow_state: auto", "vips: []"]), "lab.yaml").unwrap();
    assert_eq!(auto.settings.flow_state, FlowState::Auto);
    // Auto is second chance on a known yes from the node's conntrack only, and while no VIP
    // is forwarded encapsulated (whose receivers do not check).
    assert_eq!(
        FlowState::Auto.effective(Some(true), false),
        FlowState::SecondChance
    );
    assert_eq!(
        FlowState::Auto.effective(Some(true), true),
        FlowState::Table
    );
    for unknown_or_no in [None, Some(false)] {
        assert_eq!(
            FlowState::Auto.effective(unknown_or_no, false),
            FlowState::Table
        );
    }
    for encapsulates in [false, true] {
        assert_eq!(
            FlowState::SecondChance.effective(Some(false), encapsulates),
            FlowState::SecondChance,
            "an explicit mode is kept (and warned about)"
        );
    }
    let chance = parse(
        &yaml(&["flow_state: second-chance", "vips: []"]),
        "lab.yaml",
    )
    .unwrap();
    assert_eq!(chance.settings.flow_state, FlowState::SecondChance);
    assert_error(
        &["flow_state: conntrack", "vips: []"],
        1,
        "flow_state",
        "unknown flow_state \"conntrack\"; use table",
    );
}

#[test]
fn empty_vips_are_allowed_but_not_a_missing_list() {
    assert_eq!(parse("vips: []\n", "lab.yaml").unwrap(), Desired::default());
    assert_eq!(parse("vips:\n", "lab.yaml").unwrap(), Desired::default());
    assert_error(&["# nothing"], 1, "vips", "missing");
    assert_error(&["flow_table_size: 2048"], 1, "vips", "missing");
}

#[test]
fn syntax_error() {
    assert_error(
        &["vips:", "  - address: 10.0.0.1", "   port: 80"],
        3,
        "",
        "YAML syntax error",
    );
    assert_error(&["vips:", "\t- address: 10.0.0.1"], 2, "", "tabs");
    assert_error(&["vips: [", ""], 3, "", "YAML syntax error");
    assert_error(&["- 1"], 1, "", "must be a mapping");
    assert_error(&["vips: &all []", "more: *all"], 1, "", "anchors");
}

#[test]
fn a_second_document_is_an_error() {
    assert_error(
        &["---", "vips: []", "---", "flow_table_size: 1"],
        3,
        "",
        "second YAML document",
    );
    assert_error(&["vips: []", "...", "vips: []"], 3, "", "(`...` on line 2)");
    assert_error(&["vips: []", "--- # again"], 2, "", "second YAML document");
    assert!(parse(&yaml(&["%YAML 1.2", "---", "vips: []", "..."]), "x").is_ok());
}

#[test]
fn unknown_key() {
    assert_error(
        &["vips: []", "maglev_size: 7"],
        2,
        "maglev_size",
        "valid keys here are maglev_table_size, flow_table_size, encap_source_v4, encap_source_v6, max_new_flows_per_cpu, flow_state, peers, vips",
    );
    assert_error(
        &with(3, &["    proto: udp"]),
        4,
        "vips[0].proto",
        "address, port, protocol, mode, session_affinity, source_ranges, backends",
    );
    assert_error(
        &with(5, &["        wieght: 2"]),
        6,
        "vips[0].backends[0].wieght",
        "unknown key",
    );
}

#[test]
fn duplicate_key() {
    assert_error(
        &with(3, &["    port: 81"]),
        4,
        "vips[0].port",
        "appears twice in one mapping (line 3)",
    );
}

#[test]
fn wrong_types() {
    assert_error(
        &["vips: 10.0.0.1"],
        1,
        "vips",
        "expected a list, found a single value",
    );
    assert_error(
        &["vips:", "  - 10.0.0.1"],
        2,
        "vips[0]",
        "expected a mapping, found a single value",
    );
    let mut list_port = with(5, &[]);
    list_port[2] = "    port: [80]";
    assert_error(
        &list_port,
        3,
        "vips[0].port",
        "expected a number, found a list",
    );
    assert_error(
        &with(3, &["    backends: {address: 10.0.0.1}"])[..4],
        4,
        "vips[0].backends",
        "expected a list",
    );
    assert_error(
        &with(5, &["        drain: yes"]),
        6,
        "vips[0].backends[0].drain",
        "expected true or false, found \"yes\"",
    );
    assert_error(
        &with(5, &["        weight: 1.5"]),
        6,
        "vips[0].backends[0].weight",
        "expected a whole number",
    );
}

#[test]
fn missing_required_fields() {
    let no_port = ["vips:", "  - address: 10.200.0.10", "    backends: []"];
    assert_error(&no_port, 2, "vips[0].port", "missing");
    let no_address = ["vips:", "  - port: 80", "    backends: []"];
    assert_error(&no_address, 2, "vips[0].address", "missing");
    let empty_port = [
        "vips:",
        "  - address: 10.200.0.10",
        "    port:",
        "    backends: []",
    ];
    assert_error(&empty_port, 3, "vips[0].port", "has no value");
    assert_error(
        &["vips:", "  - address: 10.200.0.10", "    port: 80"],
        2,
        "vips[0].backends",
        "missing",
    );
    let mut no_backend_address = with(5, &[]);
    no_backend_address[4] = "      - weight: 2";
    assert_error(
        &no_backend_address,
        5,
        "vips[0].backends[0].address",
        "missing",
    );
}

#[test]
fn bad_addresses() {
    let vip_at = |addr: &'static str| {
        let mut lines = with(5, &[]);
        lines[1] = addr;
        lines
    };
    assert_error(
        &vip_at("  - address: 10.200.0.300"),
        2,
        "vips[0].address",
        "invalid IP address \"10.200.0.300\"",
    );
    assert_error(
        &vip_at("  - address: 0.0.0.0"),
        2,
        "vips[0].address",
        "0.0.0.0/8",
    );
    assert_error(
        &vip_at("  - address: 224.0.0.5"),
        2,
        "vips[0].address",
        "multicast",
    );
    assert_error(
        &vip_at("  - address: 255.255.255.255"),
        2,
        "vips[0].address",
        "broadcast",
    );
    assert_error(
        &vip_at("  - address: 127.0.0.1"),
        2,
        "vips[0].address",
        "loopback",
    );
    let mut lines = with(5, &[]);
    lines[4] = "      - address: example.com";
    assert_error(
        &lines,
        5,
        "vips[0].backends[0].address",
        "invalid IP address",
    );
}

#[test]
fn ipv6_modes_affinity_and_source_ranges() {
    let text = yaml(&[
        "encap_source_v4: 10.99.0.0/24",
        "encap_source_v6: fd99::/120",
        "vips:",
        "  - address: fd00::10",
        "    port: 443",
        "    mode: ipip",
        "    session_affinity: client_ip",
        "    source_ranges:",
        "      - 2001:db8::/32",
        "      - fd00::/8",
        "      - 2001:db8::/32",
        "    backends:",
        "      - address: 10.200.1.2",
        "      - address: fd00:1::2",
    ]);
    let desired = parse(&text, "lab.yaml").unwrap();
    assert_eq!(
        desired.settings.encap_source_v4,
        Some("10.99.0.0/24".parse().unwrap())
    );
    assert_eq!(
        desired.settings.encap_source_v6,
        Some("fd99::/120".parse().unwrap())
    );
    let vip = &desired.vips[0];
    assert_eq!(vip.key.to_string(), "[fd00::10]:443/tcp");
    assert_eq!(vip.mode, ForwardingMode::Ipip);
    assert!(vip.client_affinity);
    let ranges: Vec<String> = vip.source_ranges.iter().map(|n| n.to_string()).collect();
    assert_eq!(
        ranges,
        ["2001:db8::/32", "fd00::/8"],
        "sorted, deduplicated"
    );
    assert_eq!(
        vip.backends.len(),
        2,
        "ipip reaches backends of both families"
    );
}

#[test]
fn bad_modes_and_ranges() {
    assert_error(
        &with(3, &["    mode: vxlan"]),
        4,
        "vips[0].mode",
        "unknown mode \"vxlan\"",
    );
    assert_error(
        &with(3, &["    session_affinity: cookie"]),
        4,
        "vips[0].session_affinity",
        "unknown session affinity",
    );
    assert_error(
        &with(3, &["    source_ranges: [10.0.0.1/8]"]),
        4,
        "vips[0].source_ranges[0]",
        "has host bits set; write 10.0.0.0/8",
    );
    assert_error(
        &with(3, &["    source_ranges:", "      - fd00::/8"]),
        5,
        "vips[0].source_ranges[0]",
        "is an IPv6 prefix",
    );
    let mut l2_mixed = with(5, &[]);
    l2_mixed[4] = "      - address: fd00::2";
    assert_error(
        &l2_mixed,
        5,
        "vips[0].backends[0]",
        "not of the VIP's family, which mode l2 needs",
    );
    let mut bad_source = with(0, &["encap_source_v4: fd99::/120"]);
    bad_source.truncate(6);
    assert_error(&bad_source, 1, "encap_source_v4", "is an IPv6 prefix");
    let mut mapped = with(5, &[]);
    mapped[1] = "  - address: ::ffff:10.0.0.1";
    assert_error(&mapped, 2, "vips[0].address", "IPv4-mapped");
}

#[test]
fn bad_ports() {
    let port = |line: &'static str| {
        let mut lines = with(5, &[]);
        lines[2] = line;
        lines
    };
    assert_error(
        &port("    port: 0"),
        3,
        "vips[0].port",
        "0 is out of range 1..=65535; use a port from 1 to 65535",
    );
    assert_error(
        &port("    port: 70000"),
        3,
        "vips[0].port",
        "70000 is out of range",
    );
    assert_error(
        &port("    port: 99999999999999999999"),
        3,
        "vips[0].port",
        "out of range",
    );
    assert_error(
        &port("    port: http"),
        3,
        "vips[0].port",
        "expected a whole number, found \"http\"",
    );
    assert_error(
        &port("    port: -1"),
        3,
        "vips[0].port",
        "expected a whole number",
    );
}

#[test]
fn bad_protocol() {
    assert_error(
        &with(3, &["    protocol: sctp"]),
        4,
        "vips[0].protocol",
        "unknown protocol \"sctp\"; use tcp or udp",
    );
}

#[test]
fn bad_mac() {
    assert_error(
        &with(5, &["        mac: zz:00"]),
        6,
        "vips[0].backends[0].mac",
        "invalid MAC address \"zz:00\": expected six hex bytes like 02:00:00:00:00:01",
    );
    assert_error(
        &with(5, &["        mac: 01:00:5e:00:00:01"]),
        6,
        "vips[0].backends[0].mac",
        "01:00:5e:00:00:01 is a multicast address",
    );
    assert_error(
        &with(5, &["        mac: ff:ff:ff:ff:ff:ff"]),
        6,
        "vips[0].backends[0].mac",
        "multicast",
    );
    assert_error(
        &with(5, &["        mac: 00:00:00:00:00:00"]),
        6,
        "vips[0].backends[0].mac",
        "not a station's address",
    );
}

#[test]
fn weight_range() {
    assert_error(
        &with(5, &["        weight: 10001"]),
        6,
        "vips[0].backends[0].weight",
        "10001 is out of range 0..=10000",
    );
    let max = parse(&yaml(&with(5, &["        weight: 10000"])), "x").unwrap();
    assert_eq!(max.vips[0].backends[0].weight, MAX_WEIGHT);
}

#[test]
fn table_sizes() {
    assert_error(
        &with(0, &["maglev_table_size: 65536"]),
        1,
        "maglev_table_size",
        "65536 is not prime; use a prime such as 65537",
    );
    assert_error(
        &with(0, &["maglev_table_size: 5"]),
        1,
        "maglev_table_size",
        "5 is out of range 7..=1000003",
    );
    assert_error(
        &with(0, &["maglev_table_size: 1000033"]),
        1,
        "maglev_table_size",
        "out of range",
    );
    assert_error(
        &with(0, &["flow_table_size: 1000"]),
        1,
        "flow_table_size",
        "1000 is out of range 1024..=67108864",
    );
    assert_error(
        &with(0, &["flow_table_size: 67108865"]),
        1,
        "flow_table_size",
        "out of range",
    );
    let largest = parse(
        &yaml(&with(
            0,
            &["maglev_table_size: 1000003", "flow_table_size: 67108864"],
        )),
        "x",
    )
    .unwrap();
    assert_eq!(
        largest.settings,
        Settings {
            maglev_table_size: Some(MAX_MAGLEV_SIZE),
            flow_table_size: 64 << 20,
            ..Settings::default()
        }
    );
}

#[test]
fn duplicate_vip() {
    let lines = with(
        5,
        &[
            "  - address: 10.200.0.11", // 6
            "    port: 80",
            "    backends: []",
            "  - address: 10.200.0.10", // 9
            "    port: 80",
            "    protocol: tcp",
            "    backends: []",
        ],
    );
    assert_error(
        &lines,
        9,
        "vips[2]",
        "duplicates vips[0] (line 2), both 10.200.0.10:80/tcp",
    );
    // The same address and port over another protocol is another VIP.
    let mut udp = lines.clone();
    udp[10] = "    protocol: udp";
    assert_eq!(parse(&yaml(&udp), "x").unwrap().vips.len(), 3);
}

#[test]
fn duplicate_backend() {
    let lines = with(
        5,
        &[
            "      - address: 10.200.1.3",
            "      - address: 10.200.1.2",
            "        drain: true",
        ],
    );
    assert_error(
        &lines,
        7,
        "vips[0].backends[2]",
        "duplicates vips[0].backends[0] (line 5), both 10.200.1.2",
    );
    // The same backend behind two VIPs is fine.
    let shared = with(
        5,
        &[
            "  - address: 10.200.0.11",
            "    port: 80",
            "    backends:",
            "      - address: 10.200.1.2",
        ],
    );
    assert_eq!(parse(&yaml(&shared), "x").unwrap().vips.len(), 2);
}

#[test]
fn more_live_backends_than_slots() {
    let mut lines = vec![
        "maglev_table_size: 7",
        "vips:",
        "  - address: 10.200.0.10",
        "    port: 80",
        "    backends:",
    ];
    let addrs: Vec<String> = (1..=8)
        .map(|i| format!("      - address: 10.200.1.{i}"))
        .collect();
    lines.extend(addrs.iter().map(String::as_str));
    assert_error(
        &lines,
        13,
        "vips[0].backends[7]",
        "8 backends take new flows but maglev_table_size is only 7",
    );
    // Backends that take no new flows need no slot.
    lines.push("        weight: 0");
    assert!(parse(&yaml(&lines), "x").is_ok());
}

#[test]
fn limits_on_vips_and_backends() {
    let vip_address = |i: u32| format!("10.{}.{}.{}", i / 65536 + 1, (i / 256) % 256, i % 256);
    let mut text = String::from("vips:\n");
    for i in 0..=MAX_VIPS {
        text += &format!(
            "  - {{address: {}, port: 80, backends: []}}\n",
            vip_address(i)
        );
    }
    let error = parse(&text, "lab.yaml").unwrap_err();
    assert_eq!(
        (error.line(), error.field()),
        (Some(MAX_VIPS as usize + 2), &*format!("vips[{MAX_VIPS}]"))
    );
    assert!(error.to_string().contains("more than 65536 VIPs"));

    // Backends are counted once however many VIPs have them: 64 VIPs sharing 100 backends
    // take 100 entries and one table.
    let shared: String = (0..100)
        .map(|j| format!("      - {{address: 172.16.0.{}}}\n", j + 1))
        .collect();
    let mut text = String::from("vips:\n");
    for i in 0..64 {
        text += &format!(
            "  - address: {}\n    port: 80\n    backends:\n{shared}",
            vip_address(i)
        );
    }
    assert!(parse(&text, "lab.yaml").is_ok());

    // MAX_BACKENDS distinct backends fill the backend table; one more overflows it.
    let per_vip = 128;
    let vips = MAX_BACKENDS / per_vip;
    let mut text = String::from("vips:\n");
    for i in 0..vips {
        text += &format!(
            "  - address: {}\n    port: 80\n    backends:\n",
            vip_address(i)
        );
        for j in 0..(per_vip + u32::from(i == vips - 1)) {
            text += &format!("      - {{address: 172.{}.{}.1}}\n", 16 + i, j);
        }
    }
    let error = parse(&text, "lab.yaml").unwrap_err();
    assert_eq!(
        error.field(),
        format!("vips[{}].backends[{per_vip}]", vips - 1)
    );
    assert_eq!(error.line(), Some(text.lines().count()));
    assert!(
        error
            .to_string()
            .contains("more than 8192 distinct backends")
    );

    // MAX_TABLES distinct sets of backends fill the tables; one more overflows them.
    let mut text = String::from("vips:\n");
    for i in 0..=MAX_TABLES {
        text += &format!(
            "  - address: {}\n    port: 80\n    backends:\n      - {{address: 172.16.{}.{}}}\n",
            vip_address(i),
            i / 250,
            i % 250 + 1
        );
    }
    let error = parse(&text, "lab.yaml").unwrap_err();
    assert_eq!(error.field(), format!("vips[{MAX_TABLES}]"));
    assert!(
        error
            .to_string()
            .contains("more than 4096 distinct sets of backends")
    );
}

#[test]
fn hostile_yaml_is_an_error_not_a_panic() {
    for text in [
        "*x",
        "a: !!str 1",
        "? [a]\n: b",
        "{",
        "[",
        "\"",
        "vips: [[[]]]",
        "vips: {}",
        "\u{feff}vips: []",
        ":",
        "- - -",
    ] {
        let _ = parse(text, "x");
    }
}

#[test]
fn load_reads_the_file_and_names_it() {
    let dir = std::env::temp_dir().join(format!("sluice-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lab.yaml");
    std::fs::write(
        &path,
        "vips:\n  - address: 10.0.0.1\n    port: 0\n    backends: []\n",
    )
    .unwrap();
    let error = load(&path).unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "{}:3: vips[0].port: 0 is out of range 1..=65535; {PORT_HINT}",
            path.display()
        )
    );
    std::fs::write(&path, "vips: []\n").unwrap();
    assert_eq!(load(&path), Ok(Desired::default()));
    std::fs::remove_dir_all(&dir).unwrap();

    let missing = dir.join("missing.yaml");
    let error = load(&missing).unwrap_err();
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("{}: cannot read the config: ", missing.display())),
        "{message}"
    );
    assert!(message.contains("No such file or directory"), "{message}");
    assert_eq!(error.line(), None);
}

#[test]
fn static_config_health_check_defaults_and_errors() {
    use crate::model::{CheckProtocol, HealthCheck};
    use std::time::Duration;
    let config = |check: &str| {
        format!(
            "vips:\n  - address: 10.0.0.10\n    port: 80\n    health_check: {check}\n    backends:\n      - address: 10.0.1.2\n        mac: 02:00:00:00:01:02\n"
        )
    };
    let d = parse(&config("{protocol: http}"), "t.yaml").unwrap();
    let c = d.vips[0].health_check.clone().unwrap();
    assert_eq!(c, HealthCheck::new(CheckProtocol::Http, 10256, "/healthz"));
    assert!(!c.implicit);
    let d = parse(
        &config("{protocol: tcp, port: 80, interval: 2s, timeout: 250ms, fall: 1, rise: 4}"),
        "t.yaml",
    )
    .unwrap();
    let c = d.vips[0].health_check.clone().unwrap();
    assert_eq!(
        (c.port, c.interval, c.timeout, c.fall, c.rise),
        (80, Duration::from_secs(2), Duration::from_millis(250), 1, 4)
    );
    for (bad, needle) in [
        ("{port: 80}", "health_check.protocol"),
        ("{protocol: icmp}", "unknown protocol"),
        ("{protocol: http, interval: soon}", "not a duration"),
        ("{protocol: http, timeout: 2s}", "at most the interval"),
        ("{protocol: http, fall: 0}", "health_check.fall"),
        ("{protocol: http, colour: red}", "unknown key"),
    ] {
        let e = parse(&config(bad), "t.yaml").unwrap_err().to_string();
        assert!(e.contains(needle) && e.contains("t.yaml:"), "{bad}: {e}");
    }
}
