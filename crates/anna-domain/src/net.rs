//! Which network addresses anna may call on a tenant's behalf (webhook URLs, and later media
//! URLs). A URL given by a tenant must not reach the operator's own network: loopback, private
//! ranges, link-local addresses (the cloud metadata services live at 169.254.169.254 and
//! fd00:ec2::254), carrier-grade NAT, multicast, reserved and documentation ranges are refused.
//! Addresses that embed an IPv4 address (IPv4-mapped, NAT64, 6to4) are judged by it.
//!
//! The check runs on every address a host name resolves to, right before connecting (see the
//! webhook client's resolver), so a name that resolves to a private address (or starts to, DNS
//! rebinding) is refused as well as an IP literal.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Why `ip` may not be called, or `None` when it is a public unicast address.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, ..) => "an unspecified or 'this network' address",
        (127, ..) => "a loopback address",
        (10, ..) | (172, 16..=31, _) | (192, 168, _) => "a private address",
        (100, 64..=127, _) => "a carrier-grade NAT address",
        (169, 254, _) => "a link-local address (cloud metadata services live there)",
        (192, 0, 0) => "an IETF protocol address",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "a documentation address",
        (198, 18..=19, _) => "a benchmarking address",
        (192, 88, 99) => "a 6to4 relay address",
        (224..=239, ..) => "a multicast address",
        (240..=255, ..) => "a reserved or broadcast address",
        _ => return None,
    })
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = embedded_v4(ip) {
        return forbidden_v4(v4);
    }
    let segments = ip.segments();
    if ip.is_unspecified() {
        return Some("an unspecified address");
    }
    if ip.is_loopback() {
        return Some("a loopback address");
    }
    Some(match segments[0] {
        s if s & 0xfe00 == 0xfc00 => "a unique-local (private) address",
        s if s & 0xffc0 == 0xfe80 => "a link-local address",
        s if s & 0xffc0 == 0xfec0 => "a site-local address",
        s if s & 0xff00 == 0xff00 => "a multicast address",
        0x2001 if segments[1] == 0x0db8 => "a documentation address",
        // Teredo tunnels reach IPv4 hosts the policy cannot see.
        0x2001 if segments[1] == 0 => "a Teredo tunnel address",
        0x0064 if segments[1] == 0xff9b && segments[2] == 1 => "a local-use NAT64 address",
        0x0100 if segments[1..4] == [0, 0, 0] => "a discard-only address",
        _ => return None,
    })
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`),
/// NAT64 (`64:ff9b::a.b.c.d`) or 6to4 (`2002:aabb:ccdd::`) address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let from = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    match s {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] | [0, 0, 0, 0, 0xffff, 0, hi, lo] => Some(from(hi, lo)),
        // ::1 and :: are loopback and unspecified, not embedded addresses.
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 || lo > 1 => Some(from(hi, lo)),
        [0x0064, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(from(hi, lo)),
        [0x2002, hi, lo, ..] => Some(from(hi, lo)),
        _ => None,
    }
}

/// Host names that always mean this machine, refused before any lookup.
pub fn is_local_name(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost" || host.ends_with(".localhost") || host == "localhost.localdomain"
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    fn reason(ip: &str) -> Option<&'static str> {
        forbidden_reason(ip.parse().expect("test address"))
    }

    #[test]
    fn refuses_what_is_not_public() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "127.255.0.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "::127.0.0.1",
            "::ffff:0:7f00:1",
            "::2",
            "2001::1",
            "64:ff9b:1::a00:1",
            "192.88.99.1",
        ] {
            assert!(reason(ip).is_some(), "{ip} must be refused");
        }
        assert_eq!(reason("169.254.169.254"), Some("a link-local address (cloud metadata services live there)"));
    }

    #[test]
    fn allows_public_addresses() {
        for ip in
            ["1.1.1.1", "8.8.8.8", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8", "2002:0808:0808::"]
        {
            assert_eq!(reason(ip), None, "{ip} is public");
        }
    }

    #[test]
    fn names_of_this_machine() {
        assert!(is_local_name("localhost"));
        assert!(is_local_name("LOCALHOST."));
        assert!(is_local_name("api.localhost"));
        assert!(!is_local_name("localhost.example.com"));
    }
}
