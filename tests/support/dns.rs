//! An in-test authoritative DNS server for one zone, whose records a test can change while it runs.
//!
//! It owns its own thread and single-threaded tokio runtime, so it works the same from a plain
//! `#[test]`, a current-thread `#[tokio::test]` or a multi-thread one, and keeps answering while the
//! test thread blocks. It listens on 127.0.0.1 only (UDP and TCP on one port) and never forwards a
//! query anywhere: a name outside its zone gets REFUSED.
//!
//! Built on hickory-proto's message types rather than hickory-server's catalog: records change at
//! runtime from a sync test, and the server must be able to go silent on demand ([`TestDns::stop`]),
//! both of which are a shared map and a flag here.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener as StdTcpListener, UdpSocket as StdUdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use hickory_resolver::proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

/// Negative answers' TTL (SOA minimum), seconds.
const NEGATIVE_TTL: u32 = 1;
/// UDP payload limit when a query carries no EDNS (RFC 1035).
const CLASSIC_UDP_PAYLOAD: u16 = 512;

/// A running server. Stops when dropped.
#[derive(Debug)]
pub struct TestDns {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

/// Record sets by (lower-cased FQDN, type): TTL and data.
type Zone = HashMap<(Name, RecordType), (u32, Vec<RData>)>;

/// What the server thread and the test share.
#[derive(Debug)]
struct State {
    zone: Name,
    records: Mutex<Zone>,
    answering: AtomicBool,
    /// Whether SRV answers carry their targets' A/AAAA records in the additional section.
    glue: AtomicBool,
    queries: AtomicUsize,
}

impl TestDns {
    /// Starts serving `zone` (e.g. `"mail.test."`) on 127.0.0.1, initially with no records.
    pub fn start(zone: &str) -> TestDns {
        let (udp, tcp) = bind_pair();
        let addr = udp.local_addr().unwrap();
        let state = Arc::new(State {
            zone: fqdn(zone),
            records: Mutex::new(HashMap::new()),
            answering: AtomicBool::new(true),
            glue: AtomicBool::new(true),
            queries: AtomicUsize::new(0),
        });
        let shutdown = CancellationToken::new();
        let thread = {
            let state = Arc::clone(&state);
            let shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name("test-dns".into())
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    runtime.block_on(serve(udp, tcp, state, shutdown));
                })
                .unwrap()
        };
        TestDns {
            addr,
            state,
            shutdown,
            thread: Some(thread),
        }
    }

    /// Where to send queries (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the A and AAAA records of `name` with `ips` (an empty slice removes both).
    pub fn set_a(&self, name: &str, ips: &[IpAddr], ttl: u32) {
        let name = self.owned(name);
        let v4: Vec<RData> = ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(RData::A(A(*v4))),
                IpAddr::V6(_) => None,
            })
            .collect();
        let v6: Vec<RData> = ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V6(v6) => Some(RData::AAAA(AAAA(*v6))),
                IpAddr::V4(_) => None,
            })
            .collect();
        let mut records = self.state.records.lock().unwrap();
        for (record_type, data) in [(RecordType::A, v4), (RecordType::AAAA, v6)] {
            if data.is_empty() {
                records.remove(&(name.clone(), record_type));
            } else {
                records.insert((name.clone(), record_type), (ttl, data));
            }
        }
    }

    /// Replaces the SRV records of `name`: `(priority, weight, port, target)` each. Relative targets
    /// are taken to be in the zone.
    pub fn set_srv(&self, name: &str, records: &[(u16, u16, u16, &str)], ttl: u32) {
        let name = self.owned(name);
        let data: Vec<RData> = records
            .iter()
            .map(|&(priority, weight, port, target)| {
                RData::SRV(SRV::new(priority, weight, port, self.owned(target)))
            })
            .collect();
        let mut all = self.state.records.lock().unwrap();
        if data.is_empty() {
            all.remove(&(name, RecordType::SRV));
        } else {
            all.insert((name, RecordType::SRV), (ttl, data));
        }
    }

    /// Removes every record of `name`: it answers NXDOMAIN from now on.
    pub fn remove(&self, name: &str) {
        let name = self.owned(name);
        self.state
            .records
            .lock()
            .unwrap()
            .retain(|(owner, _), _| *owner != name);
    }

    /// Whether SRV answers include their targets' addresses (on by default). Off makes the client
    /// look each target up itself.
    pub fn set_glue(&self, on: bool) {
        self.state.glue.store(on, Ordering::SeqCst);
    }

    /// Stops answering: queries are still read (and counted) but never answered, like a nameserver
    /// that went away without closing its port.
    pub fn stop(&self) {
        self.state.answering.store(false, Ordering::SeqCst);
    }

    /// Answers again after [`TestDns::stop`].
    pub fn resume(&self) {
        self.state.answering.store(true, Ordering::SeqCst);
    }

    /// Queries received so far (UDP and TCP, answered or not).
    pub fn query_count(&self) -> usize {
        self.state.queries.load(Ordering::SeqCst)
    }

    /// `name` as a lower-cased FQDN; a name without a trailing dot is taken as relative to the
    /// zone unless it already ends in it.
    fn owned(&self, name: &str) -> Name {
        let zone = &self.state.zone;
        let parsed = Name::from_ascii(name).unwrap().to_lowercase();
        if parsed.is_fqdn() {
            return parsed;
        }
        let mut absolute = parsed.clone();
        absolute.set_fqdn(true);
        if zone.zone_of(&absolute) {
            absolute
        } else {
            parsed.append_domain(zone).unwrap()
        }
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A UDP socket and a TCP listener on the same 127.0.0.1 port. The TCP port can be taken between
/// the two binds, so a few fresh ports are tried.
fn bind_pair() -> (StdUdpSocket, StdTcpListener) {
    let mut last_error = None;
    for _ in 0..20 {
        let udp = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        match StdTcpListener::bind(udp.local_addr().unwrap()) {
            Ok(tcp) => {
                udp.set_nonblocking(true).unwrap();
                tcp.set_nonblocking(true).unwrap();
                return (udp, tcp);
            }
            Err(error) => last_error = Some(error),
        }
    }
    panic!("no free UDP+TCP port pair on 127.0.0.1: {last_error:?}");
}

fn fqdn(name: &str) -> Name {
    let mut name = Name::from_ascii(name).unwrap().to_lowercase();
    name.set_fqdn(true);
    name
}

async fn serve(
    udp: StdUdpSocket,
    tcp: StdTcpListener,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    let udp = UdpSocket::from_std(udp).unwrap();
    let tcp = TcpListener::from_std(tcp).unwrap();
    let mut buf = vec![0u8; 65_535];
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            received = udp.recv_from(&mut buf) => {
                let Ok((len, peer)) = received else { continue };
                if let Some(reply) = state.reply(&buf[..len], true) {
                    let _ = udp.send_to(&reply, peer).await;
                }
            }
            accepted = tcp.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(serve_tcp(stream, Arc::clone(&state), shutdown.clone()));
                }
            }
        }
    }
}

/// Length-prefixed messages on one TCP connection until the client closes it.
async fn serve_tcp(mut stream: TcpStream, state: Arc<State>, shutdown: CancellationToken) {
    let session = async {
        loop {
            let len = stream.read_u16().await?;
            let mut query = vec![0u8; usize::from(len)];
            stream.read_exact(&mut query).await?;
            if let Some(reply) = state.reply(&query, false) {
                let len = u16::try_from(reply.len()).map_err(io::Error::other)?;
                stream.write_u16(len).await?;
                stream.write_all(&reply).await?;
            }
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = async { let _: io::Result<()> = session.await; } => {}
    }
}

impl State {
    /// The encoded reply to one query, or `None` to stay silent (stopped, or not a query).
    fn reply(&self, query: &[u8], udp: bool) -> Option<Vec<u8>> {
        let request = Message::from_vec(query).ok()?;
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        self.queries.fetch_add(1, Ordering::SeqCst);
        if !self.answering.load(Ordering::SeqCst) {
            return None;
        }
        let response = self.answer(&request);
        let encoded = response.to_vec().ok()?;
        let limit = request
            .edns
            .as_ref()
            .map_or(CLASSIC_UDP_PAYLOAD, Edns::max_payload)
            .max(CLASSIC_UDP_PAYLOAD);
        if udp && encoded.len() > usize::from(limit) {
            // Too big for this UDP exchange: TC tells the client to ask again over TCP.
            return response.truncate().to_vec().ok();
        }
        Some(encoded)
    }

    fn answer(&self, request: &Message) -> Message {
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.add_queries(request.queries.iter().cloned());
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(1232);
            response.set_edns(edns);
        }
        let [query] = request.queries.as_slice() else {
            response.metadata.response_code = ResponseCode::FormErr;
            return response;
        };
        if request.metadata.op_code != OpCode::Query {
            response.metadata.response_code = ResponseCode::NotImp;
            return response;
        }
        let name = query.name().to_lowercase();
        if !self.zone.zone_of(&name) {
            response.metadata.response_code = ResponseCode::Refused;
            return response;
        }
        response.metadata.authoritative = true;

        let records = self.records.lock().unwrap();
        let rrset = |owner: &Name, record_type: RecordType| {
            records
                .get(&(owner.clone(), record_type))
                .map(|(ttl, data)| {
                    data.iter()
                        .map(|d| Record::from_rdata(owner.clone(), *ttl, d.clone()))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        };
        let answers = rrset(&name, query.query_type());
        if answers.is_empty() {
            let exists = records.keys().any(|(owner, _)| *owner == name);
            if !exists {
                response.metadata.response_code = ResponseCode::NXDomain;
            }
            response.add_authority(self.soa());
            return response;
        }
        if query.query_type() == RecordType::SRV && self.glue.load(Ordering::SeqCst) {
            let mut glued: Vec<Name> = Vec::new();
            for record in &answers {
                if let RData::SRV(srv) = &record.data {
                    let target = srv.target.to_lowercase();
                    if glued.contains(&target) {
                        continue;
                    }
                    response.add_additionals(rrset(&target, RecordType::A));
                    response.add_additionals(rrset(&target, RecordType::AAAA));
                    glued.push(target);
                }
            }
        }
        response.add_answers(answers);
        response
    }

    fn soa(&self) -> Record {
        let soa = SOA::new(
            Name::from_ascii("ns")
                .unwrap()
                .append_domain(&self.zone)
                .unwrap(),
            Name::from_ascii("hostmaster")
                .unwrap()
                .append_domain(&self.zone)
                .unwrap(),
            1,
            3600,
            600,
            86_400,
            NEGATIVE_TTL,
        );
        Record::from_rdata(self.zone.clone(), NEGATIVE_TTL, RData::SOA(soa))
    }
}
