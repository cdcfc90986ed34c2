//! An authoritative DNS server for tests, serving an in-memory zone on a loopback port
//! over UDP and TCP, with the answers a real zone gives: NXDOMAIN for names that do not
//! exist, NOERROR with no answers (and the SOA in the authority section) for names that
//! exist with other types or only have names below them (RFC 8020), CNAME chains
//! followed inside the zone, truncation over UDP, and no answer at all for the names a
//! test marks as timing out. dnsmasq cannot stand in for it: it answers REFUSED for
//! names it has no data for (the DNS trap in PEERS.md).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, NULL, PTR, SOA, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};

use crate::ports::free_port;

/// A record to serve. Names are given as text, with or without the trailing dot.
#[derive(Debug, Clone, PartialEq)]
pub enum Rr {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// Preference and exchange.
    Mx(u16, String),
    /// The character-strings of one TXT record; a string over 255 bytes is split into
    /// several, as zone files do with long DKIM keys. No strings at all is an empty
    /// RDATA (illegal, but seen in the wild).
    Txt(Vec<Vec<u8>>),
    /// The same as `Txt` under RR type 99 (SPF), which RFC 7208 retired.
    Spf(Vec<Vec<u8>>),
    Ptr(String),
    Cname(String),
}

impl Rr {
    /// A TXT record of one string (split when over 255 bytes).
    pub fn txt(text: &str) -> Rr {
        Rr::Txt(vec![text.as_bytes().to_vec()])
    }
}

/// The records of a test zone. Owner names are matched case-insensitively.
#[derive(Debug, Clone, Default)]
pub struct Zone {
    nodes: HashMap<LowerName, Node>,
}

#[derive(Debug, Clone, Default)]
struct Node {
    records: Vec<Record>,
    /// Queries for a type this name has no records of are never answered.
    timeout: bool,
}

impl Zone {
    pub fn new() -> Zone {
        Zone::default()
    }

    /// Adds a record for `name`.
    pub fn add(&mut self, name: &str, rr: Rr) -> Result<&mut Zone> {
        let owner = parse_name(name)?;
        let rdata = match rr {
            Rr::A(ip) => RData::A(A(ip)),
            Rr::Aaaa(ip) => RData::AAAA(AAAA(ip)),
            Rr::Mx(preference, exchange) => RData::MX(MX::new(preference, parse_name(&exchange)?)),
            Rr::Txt(strings) => RData::TXT(txt(&strings)),
            Rr::Spf(strings) => RData::Unknown {
                code: RecordType::Unknown(99),
                rdata: match txt_wire(&strings) {
                    wire if wire.is_empty() => NULL::new(),
                    wire => NULL::with(wire),
                },
            },
            Rr::Ptr(target) => RData::PTR(PTR(parse_name(&target)?)),
            Rr::Cname(target) => RData::CNAME(CNAME(parse_name(&target)?)),
        };
        let record = Record::from_rdata(owner.clone(), 0, rdata);
        self.nodes
            .entry(LowerName::new(&owner))
            .or_default()
            .records
            .push(record);
        Ok(self)
    }

    /// Marks `name` as timing out: a query for a type it has records of is answered, any
    /// other query for it gets no response at all (as the openspf suite's `TIMEOUT`).
    pub fn timeout(&mut self, name: &str) -> Result<&mut Zone> {
        let owner = parse_name(name)?;
        self.nodes
            .entry(LowerName::new(&owner))
            .or_default()
            .timeout = true;
        Ok(self)
    }

    /// The response to `query` (or none: the query is to time out).
    fn answer(&self, query: &Message) -> Option<Message> {
        let mut response = Message::response(query.metadata.id, query.metadata.op_code);
        response.metadata.recursion_desired = query.metadata.recursion_desired;
        response.add_queries(query.queries.iter().cloned());
        if let Some(edns) = &query.edns {
            let mut ours = edns.clone();
            ours.set_max_payload(4096);
            response.set_edns(ours);
        }
        let [q] = query.queries.as_slice() else {
            response.metadata.response_code = ResponseCode::FormErr;
            return Some(response);
        };
        if query.metadata.op_code != OpCode::Query
            || query.metadata.message_type != MessageType::Query
        {
            response.metadata.response_code = ResponseCode::NotImp;
            return Some(response);
        }
        response.metadata.authoritative = true;
        let qtype = q.query_type();
        let mut name = LowerName::new(q.name());
        let mut seen = Vec::new();
        loop {
            let Some(node) = self.nodes.get(&name) else {
                if !self.has_names_below(&name) {
                    response.metadata.response_code = ResponseCode::NXDomain;
                }
                response.add_authority(soa_for(&name));
                return Some(response);
            };
            let matching: Vec<Record> = node
                .records
                .iter()
                .filter(|r| r.record_type() == qtype || qtype == RecordType::ANY)
                .cloned()
                .collect();
            if !matching.is_empty() {
                response.add_answers(matching);
                return Some(response);
            }
            // A CNAME stands for all the other types of its owner (RFC 1034 3.6.2).
            let cname = node.records.iter().find_map(|r| match &r.data {
                RData::CNAME(target) => Some((r.clone(), target.0.clone())),
                _ => None,
            });
            if let Some((record, target)) = cname {
                seen.push(name.clone());
                response.add_answer(record);
                name = LowerName::new(&target);
                if seen.contains(&name) {
                    // A loop: answer with the chain so far, as BIND does.
                    return Some(response);
                }
                continue;
            }
            if node.timeout {
                return None;
            }
            response.add_authority(soa_for(&name));
            return Some(response);
        }
    }

    fn has_names_below(&self, name: &LowerName) -> bool {
        self.nodes.keys().any(|k| name.zone_of(k) && k != name)
    }
}

/// The authoritative server: runs on two threads until dropped.
pub struct AuthDns {
    pub port: u16,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl AuthDns {
    /// Serves `zone` on 127.0.0.1, UDP and TCP, on a port from the kit's allocator.
    pub fn start(zone: Zone) -> Result<AuthDns> {
        let zone = Arc::new(zone);
        let stop = Arc::new(AtomicBool::new(false));
        let port = free_port();
        let udp = UdpSocket::bind(("127.0.0.1", port)).context("binding the DNS UDP port")?;
        // The read timeout is how often the thread looks at `stop`.
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        let tcp = TcpListener::bind(("127.0.0.1", port)).context("binding the DNS TCP port")?;
        let mut threads = Vec::new();
        {
            let (zone, stop) = (zone.clone(), stop.clone());
            threads.push(std::thread::spawn(move || serve_udp(&udp, &zone, &stop)));
        }
        {
            let (zone, stop) = (zone.clone(), stop.clone());
            threads.push(std::thread::spawn(move || serve_tcp(&tcp, &zone, &stop)));
        }
        Ok(AuthDns {
            port,
            stop,
            threads,
        })
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The `network.dns.servers` value for this server.
    pub fn servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for AuthDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees `stop`.
        let _ = TcpStream::connect(self.addr());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_udp(socket: &UdpSocket, zone: &Zone, stop: &AtomicBool) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        let Ok((len, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Ok(query) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        let Some(response) = zone.answer(&query) else {
            continue;
        };
        // Without EDNS a UDP answer is limited to 512 bytes (RFC 1035 4.2.1); over the
        // limit the client is told to ask again over TCP.
        let limit = query
            .edns
            .as_ref()
            .map_or(512, |e| usize::from(e.max_payload().max(512)));
        let Ok(mut wire) = response.to_vec() else {
            continue;
        };
        if wire.len() > limit {
            let Ok(truncated) = response.truncate().to_vec() else {
                continue;
            };
            wire = truncated;
        }
        let _ = socket.send_to(&wire, peer);
    }
}

fn serve_tcp(listener: &TcpListener, zone: &Arc<Zone>, stop: &Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        let (zone, stop) = (zone.clone(), stop.clone());
        std::thread::spawn(move || {
            let _ = serve_tcp_conn(conn, &zone, &stop);
        });
    }
}

fn serve_tcp_conn(mut conn: TcpStream, zone: &Zone, stop: &AtomicBool) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    while !stop.load(Ordering::SeqCst) {
        let mut len = [0u8; 2];
        conn.read_exact(&mut len)?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        conn.read_exact(&mut buf)?;
        let query = Message::from_vec(&buf)?;
        // A query that is to time out gets no answer; the client gives up on its own.
        let Some(response) = zone.answer(&query) else {
            continue;
        };
        let wire = response.to_vec()?;
        let Ok(len) = u16::try_from(wire.len()) else {
            bail!(
                "a DNS answer of {} bytes does not fit TCP framing",
                wire.len()
            );
        };
        conn.write_all(&len.to_be_bytes())?;
        conn.write_all(&wire)?;
    }
    Ok(())
}

/// A name from text, labels taken as they are (no escapes), absolute.
fn parse_name(text: &str) -> Result<Name> {
    let text = text.strip_suffix('.').unwrap_or(text);
    if text.is_empty() {
        return Ok(Name::root());
    }
    let mut name = Name::from_labels(text.split('.').map(str::as_bytes))
        .with_context(|| format!("{text:?} is not a DNS name"))?;
    name.set_fqdn(true);
    Ok(name)
}

/// A TXT RDATA from character-strings, each over 255 bytes split into several.
fn txt(strings: &[Vec<u8>]) -> TXT {
    let pieces: Vec<&[u8]> = strings.iter().flat_map(|s| split255(s)).collect();
    TXT::from_bytes(pieces)
}

/// The wire form of TXT-like RDATA, for RR type 99 (which hickory has no type for).
fn txt_wire(strings: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in strings.iter().flat_map(|s| split255(s)) {
        // split255 guarantees the length fits.
        out.push(u8::try_from(piece.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(piece);
    }
    out
}

fn split255(s: &[u8]) -> Vec<&[u8]> {
    if s.is_empty() {
        // One empty character-string, not none.
        return vec![s];
    }
    s.chunks(255).collect()
}

/// The SOA a negative answer carries in its authority section: the zone is taken to be
/// the name's last two labels (`example.com.`), with a negative TTL of zero so that
/// nothing is cached between tests.
fn soa_for(name: &LowerName) -> Record {
    let name = Name::from(name);
    let labels = name.num_labels();
    let apex = if labels > 2 {
        name.trim_to(2)
    } else {
        name.clone()
    };
    let host = |l: &str| Name::from_ascii(l).unwrap_or_else(|_| Name::root());
    Record::from_rdata(
        apex,
        0,
        RData::SOA(SOA::new(
            host("ns.authdns.test."),
            host("hostmaster.authdns.test."),
            1,
            3600,
            600,
            86400,
            0,
        )),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(zone: &Zone, name: &str, qtype: RecordType) -> Option<Message> {
        let mut q = Message::query();
        q.add_query(hickory_proto::op::Query::query(
            parse_name(name).expect("name"),
            qtype,
        ));
        zone.answer(&q)
    }

    #[test]
    fn answers_as_an_authoritative_zone_does() {
        let mut zone = Zone::new();
        zone.add("a.example.com", Rr::A(Ipv4Addr::new(192, 0, 2, 1)))
            .and_then(|z| z.add("a.example.com", Rr::txt("v=spf1 -all")))
            .and_then(|z| z.add("alias.example.com", Rr::Cname("A.example.com.".into())))
            .and_then(|z| z.add("loop.example.com", Rr::Cname("loop.example.com".into())))
            .and_then(|z| z.timeout("slow.example.com"))
            .and_then(|z| z.add("slow.example.com", Rr::A(Ipv4Addr::new(192, 0, 2, 2))))
            .expect("zone");
        let rcode = |m: &Message| m.metadata.response_code;
        // A record of the type asked for.
        let m = ask(&zone, "A.Example.Com.", RecordType::A).expect("answered");
        assert_eq!((rcode(&m), m.answers.len()), (ResponseCode::NoError, 1));
        // The name exists with other types: NOERROR, no answers, SOA in authority.
        let m = ask(&zone, "a.example.com", RecordType::AAAA).expect("answered");
        assert_eq!((rcode(&m), m.answers.len()), (ResponseCode::NoError, 0));
        assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
        // An empty non-terminal exists too.
        let m = ask(&zone, "example.com", RecordType::TXT).expect("answered");
        assert_eq!(rcode(&m), ResponseCode::NoError);
        // An absent name is NXDOMAIN, never REFUSED.
        let m = ask(&zone, "absent.example.com", RecordType::TXT).expect("answered");
        assert_eq!(rcode(&m), ResponseCode::NXDomain);
        // CNAMEs are followed inside the zone; a loop ends the chain.
        let m = ask(&zone, "alias.example.com", RecordType::TXT).expect("answered");
        let types: Vec<_> = m.answers.iter().map(Record::record_type).collect();
        assert_eq!(types, [RecordType::CNAME, RecordType::TXT]);
        let m = ask(&zone, "loop.example.com", RecordType::A).expect("answered");
        assert_eq!(m.answers.len(), 1);
        // Timing out: the types it has are answered, the others never.
        assert!(ask(&zone, "slow.example.com", RecordType::A).is_some());
        assert!(ask(&zone, "slow.example.com", RecordType::TXT).is_none());
    }

    #[test]
    fn long_txt_strings_are_split() {
        let long = vec![b'k'; 600];
        let mut zone = Zone::new();
        zone.add("key.example.com", Rr::Txt(vec![long.clone()]))
            .expect("zone");
        let m = ask(&zone, "key.example.com", RecordType::TXT).expect("answered");
        let RData::TXT(t) = &m.answers[0].data else {
            panic!("not a TXT record: {:?}", m.answers[0]);
        };
        let lens: Vec<usize> = t.txt_data.iter().map(|s| s.len()).collect();
        assert_eq!(lens, [255, 255, 90]);
        assert_eq!(txt_wire(&[long]).len(), 600 + 3);
    }

    #[test]
    fn serves_over_udp_and_tcp() {
        let mut zone = Zone::new();
        zone.add("big.example.com", Rr::Txt(vec![vec![b'x'; 1000]]))
            .expect("zone");
        let server = AuthDns::start(zone).expect("start");
        let mut q = Message::query();
        q.add_query(hickory_proto::op::Query::query(
            parse_name("big.example.com").expect("name"),
            RecordType::TXT,
        ));
        let wire = q.to_vec().expect("encode");
        // Over UDP without EDNS the 1000-byte answer is truncated.
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind");
        udp.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        udp.send_to(&wire, server.addr()).expect("send");
        let mut buf = [0u8; 4096];
        let (len, _) = udp.recv_from(&mut buf).expect("an answer over UDP");
        let m = Message::from_vec(&buf[..len]).expect("decode");
        assert!(m.metadata.truncation, "{m:?}");
        // Over TCP it comes whole.
        let mut tcp = TcpStream::connect(server.addr()).expect("connect");
        let len = u16::try_from(wire.len()).expect("short");
        tcp.write_all(&len.to_be_bytes()).expect("write");
        tcp.write_all(&wire).expect("write");
        let mut len = [0u8; 2];
        tcp.read_exact(&mut len).expect("read");
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        tcp.read_exact(&mut buf).expect("read");
        let m = Message::from_vec(&buf).expect("decode");
        assert_eq!(m.answers.len(), 1);
        assert!(!m.metadata.truncation);
    }
}
