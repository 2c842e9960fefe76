//! PROXY protocol: `parse` never panics, a complete header lies within the input and parses the same
//! from exactly its own bytes (how `read_header` reads it) but never from fewer, a v1 header ends at
//! its CRLF, and what `encode` builds parses back to the client address it was given.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use popgate::proxy_protocol::{self, Parsed};

/// Parses `data` as the start of a stream; then, when `data` is long enough, builds two addresses
/// from its first 37 bytes and round-trips them through both header versions.
pub fn check(data: &[u8]) {
    if let Parsed::Complete { len, client } = proxy_protocol::parse(data) {
        assert!(len > 0 && len <= data.len(), "len {len} of {}", data.len());
        let header = &data[..len];
        assert_eq!(
            proxy_protocol::parse(header),
            Parsed::Complete { len, client },
            "the header alone parses differently"
        );
        if header.starts_with(b"PROXY") {
            assert!(header.ends_with(b"\r\n"), "a v1 header not ended by CRLF");
            assert_eq!(
                header.iter().filter(|&&b| b == b'\n').count(),
                1,
                "a v1 header spanning a line break"
            );
        }
        for cut in 0..len {
            assert!(
                !matches!(proxy_protocol::parse(&data[..cut]), Parsed::Complete { .. }),
                "{cut} of {len} header bytes parsed as a complete header"
            );
        }
    }

    if let Some((client, local)) = addresses(data) {
        for version in [1, 2] {
            let header = proxy_protocol::encode(version, client, local);
            let want = match (client, local.is_ipv6()) {
                (SocketAddr::V4(v4), true) => {
                    SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
                }
                (other, _) => other,
            };
            assert_eq!(
                proxy_protocol::parse(&header),
                Parsed::Complete {
                    len: header.len(),
                    client: Some(want)
                },
                "v{version} header for {client} -> {local}"
            );
        }
        for version in [1, 2] {
            let header = proxy_protocol::encode_local(version);
            assert_eq!(
                proxy_protocol::parse(&header),
                Parsed::Complete {
                    len: header.len(),
                    client: None
                }
            );
        }
    }
}

/// `[flags, client ip (16), client port (2), local ip (16), local port (2)]`; flag bits pick IPv4.
fn addresses(data: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let (&flags, rest) = data.split_first()?;
    let addr = |b: &[u8], v4: bool| -> Option<SocketAddr> {
        let port = u16::from_be_bytes([*b.get(16)?, *b.get(17)?]);
        let ip = if v4 {
            IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        } else {
            let octets: [u8; 16] = b.get(..16)?.try_into().ok()?;
            IpAddr::V6(Ipv6Addr::from(octets))
        };
        Some(SocketAddr::new(ip, port))
    };
    Some((
        addr(rest.get(..18)?, flags & 1 != 0)?,
        addr(rest.get(18..36)?, flags & 2 != 0)?,
    ))
}
