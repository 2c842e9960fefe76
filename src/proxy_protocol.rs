//! PROXY protocol v1/v2 (HAProxy's spec) via the `ppp` crate: building the header popgate sends to stores,
//! and reading the header a load balancer in front of popgate sends, only on listeners that expect it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ppp::v2;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// v1 headers are at most 107 octets; v2 with TLVs can be longer, but nothing we accept needs more.
const MAX_HEADER: usize = 536;

/// Why an inbound PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// No complete header before the deadline.
    #[error("no PROXY header in time")]
    Timeout,
    /// Not a valid v1 or v2 header.
    #[error("invalid PROXY header")]
    Invalid,
    /// The connection closed first.
    #[error("connection closed before the PROXY header")]
    Closed,
    /// A socket error.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Builds a header saying the connection comes from `client` to `local` (v1 text or v2 binary).
pub fn encode(version: u8, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (src, dst) = same_family(client, local);
    if version == 1 {
        return ppp::v1::Addresses::from((src, dst))
            .to_string()
            .into_bytes();
    }
    v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (src, dst),
    )
    .build()
    .unwrap_or_default()
}

/// A header for a connection popgate makes on its own behalf (health probes, pre-warming): v1 `UNKNOWN`,
/// v2 `LOCAL`. The store then uses the TCP peer address, which is popgate's.
pub fn encode_local(version: u8) -> Vec<u8> {
    if version == 1 {
        return b"PROXY UNKNOWN\r\n".to_vec();
    }
    v2::Builder::new(v2::Version::Two | v2::Command::Local, 0)
        .build()
        .unwrap_or_default()
}

/// The header needs both addresses in one family; an IPv4 address is mapped into IPv6 when they differ.
fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |s: SocketAddr| match s.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), s.port()),
        IpAddr::V6(_) => s,
    };
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        (v6(a), v6(b))
    }
}

/// Reads exactly one PROXY header from `tcp` (nothing after it: peeking first, then consuming only the
/// header's bytes, so the POP3 or TLS bytes behind it stay in the socket). Returns the client address it
/// names, or `None` for `UNKNOWN`/LOCAL (health checks from the balancer itself).
pub async fn read_header(
    tcp: &mut TcpStream,
    limit: Duration,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    tokio::time::timeout(limit, read_header_inner(tcp))
        .await
        .map_err(|_| ProxyHeaderError::Timeout)?
}

async fn read_header_inner(tcp: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    // Read exactly the header's bytes and no more, so what follows (POP3 or a TLS ClientHello) stays
    // in the socket for the next stage.
    let mut header = vec![0u8; 5];
    read_exact(tcp, &mut header).await?;
    if header == b"PROXY" {
        // v1: text up to LF, at most 107 octets in all.
        let mut byte = [0u8; 1];
        while header.last() != Some(&b'\n') {
            if header.len() >= 107 {
                return Err(ProxyHeaderError::Invalid);
            }
            read_exact(tcp, &mut byte).await?;
            header.push(byte[0]);
        }
    } else if header[..] == v2::PROTOCOL_PREFIX[..5] {
        // v2: 16 fixed octets, the last two giving the length of the rest.
        header.resize(16, 0);
        read_exact(tcp, &mut header[5..]).await?;
        let rest = usize::from(u16::from_be_bytes([header[14], header[15]]));
        if 16 + rest > MAX_HEADER {
            return Err(ProxyHeaderError::Invalid);
        }
        header.resize(16 + rest, 0);
        read_exact(tcp, &mut header[16..]).await?;
    } else {
        return Err(ProxyHeaderError::Invalid);
    }
    match parse(&header) {
        Parsed::Complete { len, client } if len == header.len() => Ok(client),
        _ => Err(ProxyHeaderError::Invalid),
    }
}

async fn read_exact(tcp: &mut TcpStream, buf: &mut [u8]) -> Result<(), ProxyHeaderError> {
    match tcp.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ProxyHeaderError::Closed),
        Err(e) => Err(ProxyHeaderError::Io(e)),
    }
}

/// Result of parsing the start of a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header of `len` bytes naming `client` (`None` for UNKNOWN/LOCAL).
    Complete {
        /// Header length in bytes.
        len: usize,
        /// Source address.
        client: Option<SocketAddr>,
    },
    /// Could still become a header with more bytes.
    Incomplete,
    /// Not a header.
    Invalid,
}

/// Parses a PROXY header at the start of `input` (v2 binary or v1 text). No I/O; fuzzable.
pub fn parse(input: &[u8]) -> Parsed {
    use ppp::PartialResult;
    match ppp::HeaderResult::parse(input) {
        ppp::HeaderResult::V2(Ok(h)) => {
            let client = match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (_, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (_, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                _ => None,
            };
            Parsed::Complete {
                len: h.len(),
                client,
            }
        }
        // A v1 header ends with CRLF (HAProxy's spec); a lone LF would make its length depend on what
        // happens to be buffered.
        ppp::HeaderResult::V1(Ok(h))
            if !h.header.ends_with("\r\n") || h.header.matches('\n').count() != 1 =>
        {
            Parsed::Invalid
        }
        ppp::HeaderResult::V1(Ok(h)) => {
            let client = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Tcp6(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Unknown => None,
            };
            Parsed::Complete {
                len: h.header.len(),
                client,
            }
        }
        r if r.is_incomplete() => Parsed::Incomplete,
        _ => Parsed::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    #[test]
    fn round_trip_both_versions_in_any_chunking() {
        for version in [1, 2] {
            for (client, local) in [
                ("192.0.2.7:40000", "198.51.100.1:995"),
                ("[2001:db8::1]:5555", "[2001:db8::2]:110"),
                ("192.0.2.7:40000", "[2001:db8::2]:110"),
            ] {
                let mut bytes = encode(version, addr(client), addr(local));
                let len = bytes.len();
                bytes.extend_from_slice(b"CAPA\r\n");
                let want = match addr(client) {
                    SocketAddr::V4(v4) if addr(local).is_ipv6() => {
                        SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
                    }
                    other => other,
                };
                assert_eq!(
                    parse(&bytes),
                    Parsed::Complete {
                        len,
                        client: Some(want)
                    },
                    "v{version} {client}"
                );
                for cut in 1..len {
                    assert!(
                        !matches!(parse(&bytes[..cut]), Parsed::Complete { .. }),
                        "v{version}: a truncated header parsed as complete at {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn garbage_is_invalid() {
        assert_eq!(parse(b"USER alice\r\n"), Parsed::Invalid);
        assert!(!matches!(
            parse(b"PROXY TCP4 1.2.3.4 nonsense\r\n"),
            Parsed::Complete { .. }
        ));
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Parsed::Complete {
                len: 15,
                client: None
            }
        );
    }
}
