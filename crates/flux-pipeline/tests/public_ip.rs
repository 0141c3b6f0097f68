//! The address filter of guarded image downloads, checked against the IANA special-purpose
//! address registries (RFC 6890 and its updates) and the cloud metadata endpoints.

use flux_pipeline::image_io::is_public_ip;
use std::net::IpAddr;

fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad test address {s}: {e}"))
}

/// Addresses a public server must never fetch from, each with the block it belongs to.
const REFUSED: &[(&str, &str)] = &[
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "this network 0/8"),
    ("10.0.0.1", "private 10/8"),
    ("10.255.255.255", "private 10/8, last"),
    ("100.64.0.0", "shared CGNAT 100.64/10, first"),
    ("100.100.100.200", "shared CGNAT (Alibaba Cloud metadata)"),
    ("100.127.255.255", "shared CGNAT, last"),
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback 127/8"),
    ("169.254.169.254", "link-local (AWS, GCP, Azure metadata)"),
    ("169.254.0.1", "link-local"),
    ("172.16.0.1", "private 172.16/12, first"),
    ("172.31.255.255", "private 172.16/12, last"),
    ("192.0.0.8", "IETF protocol assignments 192.0.0/24"),
    ("192.0.2.10", "TEST-NET-1"),
    ("192.168.1.1", "private 192.168/16"),
    ("198.18.0.1", "benchmarking 198.18/15"),
    ("198.19.255.255", "benchmarking 198.18/15, last"),
    ("198.51.100.7", "TEST-NET-2"),
    ("203.0.113.9", "TEST-NET-3"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast (SSDP)"),
    ("240.0.0.1", "reserved 240/4"),
    ("255.255.255.255", "limited broadcast"),
    ("::", "IPv6 unspecified"),
    ("::1", "IPv6 loopback"),
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
    ("::ffff:169.254.169.254", "IPv4-mapped metadata"),
    ("::ffff:10.1.2.3", "IPv4-mapped private"),
    ("::127.0.0.1", "IPv4-compatible loopback"),
    ("::192.168.0.1", "IPv4-compatible private"),
    ("64:ff9b::a00:1", "NAT64 of 10.0.0.1"),
    ("64:ff9b::a9fe:a9fe", "NAT64 of 169.254.169.254"),
    ("2002:7f00:1::", "6to4 of 127.0.0.1"),
    ("2002:a9fe:a9fe::1", "6to4 of 169.254.169.254"),
    ("fc00::1", "unique local fc00::/7"),
    ("fd00:ec2::254", "unique local (AWS IPv6 metadata)"),
    ("fe80::1", "link-local fe80::/10"),
    ("febf:ffff::1", "link-local fe80::/10, last"),
    ("fec0::1", "site-local (deprecated)"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "documentation 2001:db8::/32"),
    ("100::1", "discard-only 100::/64"),
];

/// Ordinary public addresses, many just outside a refused block.
const ALLOWED: &[(&str, &str)] = &[
    ("1.1.1.1", "public"),
    ("8.8.8.8", "public"),
    ("9.255.255.255", "just below 10/8"),
    ("11.0.0.0", "just above 10/8"),
    ("100.63.255.255", "just below 100.64/10"),
    ("100.128.0.0", "just above 100.64/10"),
    ("126.255.255.255", "just below 127/8"),
    ("169.253.255.255", "just below 169.254/16"),
    ("172.15.255.255", "just below 172.16/12"),
    ("172.32.0.0", "just above 172.16/12"),
    ("192.0.1.1", "just above 192.0.0/24"),
    ("192.167.255.255", "just below 192.168/16"),
    ("192.169.0.0", "just above 192.168/16"),
    ("198.17.255.255", "just below 198.18/15"),
    ("198.20.0.0", "just above 198.18/15"),
    ("223.255.255.254", "just below multicast"),
    ("2606:4700:4700::1111", "public IPv6"),
    ("2001:4860:4860::8888", "public IPv6"),
    ("::ffff:8.8.8.8", "IPv4-mapped public"),
    ("64:ff9b::808:808", "NAT64 of 8.8.8.8"),
    ("2002:808:808::1", "6to4 of 8.8.8.8"),
    ("2001:db9::1", "just above 2001:db8::/32"),
];

#[test]
fn special_purpose_addresses_are_refused() {
    let wrong: Vec<_> = REFUSED
        .iter()
        .filter(|(a, _)| is_public_ip(ip(a)))
        .map(|(a, why)| format!("{a} ({why})"))
        .collect();
    assert!(wrong.is_empty(), "judged public: {wrong:?}");
}

#[test]
fn public_addresses_are_allowed() {
    let wrong: Vec<_> = ALLOWED
        .iter()
        .filter(|(a, _)| !is_public_ip(ip(a)))
        .map(|(a, why)| format!("{a} ({why})"))
        .collect();
    assert!(wrong.is_empty(), "judged not public: {wrong:?}");
}
