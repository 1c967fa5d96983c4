//! Which address a request comes from when optgate sits behind a reverse proxy (the
//! TLS terminator in front of `public_url`): what consent evidence records and what
//! the per-IP limits count. Sans-IO: a peer, the `X-Forwarded-For` lines, a list.
//!
//! Each proxy appends the address it got the request from to `X-Forwarded-For`, so
//! the list is read from the right: the nearest address that is not one of
//! `http.trusted_proxies` is the client. What stands left of it was written by the
//! client itself and is not believed; an entry we cannot read ends the walk there.
//! With no trusted proxy (the default) the header is ignored: anyone can send one.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderValue;
use ipnet::IpNet;

use super::ratelimit::canonical_ip;

/// The client behind `peer`, given the request's `X-Forwarded-For` lines in order.
pub(super) fn client<'a>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'a HeaderValue>,
    trusted: &[IpNet],
) -> IpAddr {
    let is_proxy = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    let mut client = canonical_ip(peer);
    if !is_proxy(&client) {
        return client;
    }
    for line in forwarded_for.rev() {
        let Ok(line) = line.to_str() else {
            return client;
        };
        for entry in line.rsplit(',') {
            let Some(ip) = parse_entry(entry.trim()) else {
                return client;
            };
            client = canonical_ip(ip);
            if !is_proxy(&client) {
                return client;
            }
        }
    }
    client
}

/// `192.0.2.1`, `2001:db8::1`, and the forms some proxies write with a port or in
/// brackets: `192.0.2.1:4711`, `[2001:db8::1]`, `[2001:db8::1]:4711`.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| entry.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    /// Each case: the TCP peer, the X-Forwarded-For lines, the trusted list, the client.
    fn check(cases: &[(&str, &[&str], &[&str], &str)]) {
        for &(peer, lines, trusted, expected) in cases {
            let values: Vec<HeaderValue> = lines
                .iter()
                .map(|l| HeaderValue::from_str(l).unwrap())
                .collect();
            let found = client(ip(peer), values.iter(), &nets(trusted));
            assert_eq!(
                found,
                ip(expected),
                "peer {peer}, {lines:?}, trusted {trusted:?}"
            );
        }
    }

    const OURS: &[&str] = &["127.0.0.1/32", "10.0.0.0/8"];

    #[test]
    fn without_trusted_proxies_the_header_is_ignored() {
        check(&[
            ("203.0.113.5", &["198.51.100.7"], &[], "203.0.113.5"),
            // A peer that is not a trusted proxy cannot speak for anyone else either.
            ("203.0.113.5", &["198.51.100.7"], OURS, "203.0.113.5"),
        ]);
    }

    #[test]
    fn the_nearest_untrusted_address_is_the_client() {
        check(&[
            ("127.0.0.1", &["198.51.100.7"], OURS, "198.51.100.7"),
            // A chain of our own proxies is walked through; what the client wrote
            // itself, left of its real address, is not believed.
            (
                "127.0.0.1",
                &["6.6.6.6, 198.51.100.7", "10.1.2.3"],
                OURS,
                "198.51.100.7",
            ),
            ("127.0.0.1", &["[2001:db8::7]:4711"], OURS, "2001:db8::7"),
            ("127.0.0.1", &["192.0.2.9:4711"], OURS, "192.0.2.9"),
            // Nothing but our own proxies: the farthest of them.
            ("127.0.0.1", &["10.0.0.1, 10.0.0.2"], OURS, "10.0.0.1"),
            // IPv4-mapped addresses count as IPv4, the peer's and the listed ones.
            (
                "::ffff:127.0.0.1",
                &["::ffff:198.51.100.7"],
                OURS,
                "198.51.100.7",
            ),
        ]);
    }

    #[test]
    fn an_unreadable_entry_ends_the_walk_at_the_last_hop_read() {
        check(&[
            ("127.0.0.1", &["198.51.100.7, unknown"], OURS, "127.0.0.1"),
            (
                "127.0.0.1",
                &["198.51.100.7, garbage, 10.0.0.2"],
                OURS,
                "10.0.0.2",
            ),
            // No header at all: the proxy itself.
            ("127.0.0.1", &[], OURS, "127.0.0.1"),
        ]);
    }
}
