//! Asking an upstream resolver for A and AAAA records.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
};

/// How long one server may take to answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("'{0}' is not a valid DNS name")]
    BadName(String),
    #[error(
        "no upstream DNS server is configured (dns.upstream, or nameservers in /etc/resolv.conf)"
    )]
    NoUpstream,
    #[error("{name}: {code}")]
    Rcode { name: String, code: ResponseCode },
    #[error("{name}: every upstream failed ({last})")]
    Failed { name: String, last: String },
}

/// An address and the TTL the answer gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    pub ip: IpAddr,
    pub ttl: u32,
}

/// Resolves `name` to its A and AAAA addresses through `servers`, following CNAME chains in
/// the answers. NXDOMAIN and "no data" give an empty list, not an error.
pub async fn lookup(name: &str, servers: &[SocketAddr]) -> Result<Vec<Addr>, DnsError> {
    if servers.is_empty() {
        return Err(DnsError::NoUpstream);
    }
    let fqdn = Name::from_ascii(format!("{}.", name.trim_end_matches('.')))
        .map_err(|_| DnsError::BadName(name.to_owned()))?;
    let mut out = Vec::new();
    for rtype in [RecordType::A, RecordType::AAAA] {
        let query = Query::query(fqdn.clone(), rtype);
        let response = ask_any(&query, servers, name).await?;
        match response.metadata.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => {}
            code => {
                return Err(DnsError::Rcode {
                    name: name.to_owned(),
                    code,
                });
            }
        }
        out.extend(addresses(&response, &fqdn));
    }
    Ok(out)
}

/// The addresses an answer gives for `name`, through any CNAME chain it contains.
pub fn addresses(response: &Message, name: &Name) -> Vec<Addr> {
    let mut wanted = vec![name.to_lowercase()];
    // A chain is at most as long as the answer section.
    for _ in 0..response.answers.len() {
        let mut grew = false;
        for r in &response.answers {
            if let RData::CNAME(target) = &r.data {
                let owner = r.name.to_lowercase();
                let target = target.0.to_lowercase();
                if wanted.contains(&owner) && !wanted.contains(&target) {
                    wanted.push(target);
                    grew = true;
                }
            }
        }
        if !grew {
            break;
        }
    }
    response
        .answers
        .iter()
        .filter(|r| wanted.contains(&r.name.to_lowercase()))
        .filter_map(|r| {
            let ip = match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => return None,
            };
            Some(Addr { ip, ttl: r.ttl })
        })
        .collect()
}

/// Asks each server in turn until one answers.
pub async fn ask_any(
    query: &Query,
    servers: &[SocketAddr],
    name: &str,
) -> Result<Message, DnsError> {
    let mut last = String::from("no answer");
    for server in servers {
        match ask(query, *server).await {
            Ok(m) => return Ok(m),
            Err(e) => last = format!("{server}: {e}"),
        }
    }
    Err(DnsError::Failed {
        name: name.to_owned(),
        last,
    })
}

/// One query to one server: UDP, and TCP when the answer is truncated.
pub async fn ask(query: &Query, server: SocketAddr) -> Result<Message, String> {
    let mut msg = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(query.clone());
    let bytes = msg.to_vec().map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(QUERY_TIMEOUT, ask_udp(&bytes, server))
        .await
        .map_err(|_| "timed out".to_string())??;
    let response = if response.metadata.truncation {
        tokio::time::timeout(QUERY_TIMEOUT, ask_tcp(&bytes, server))
            .await
            .map_err(|_| "timed out over TCP".to_string())??
    } else {
        response
    };
    if response.metadata.id != msg.metadata.id
        || response.metadata.message_type != MessageType::Response
        || response.queries.first() != Some(query)
    {
        return Err("answer does not match the question".into());
    }
    Ok(response)
}

async fn ask_udp(bytes: &[u8], server: SocketAddr) -> Result<Message, String> {
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().expect("static")
    } else {
        "[::]:0".parse().expect("static")
    };
    let socket = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
    socket.connect(server).await.map_err(|e| e.to_string())?;
    socket.send(bytes).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    let n = socket.recv(&mut buf).await.map_err(|e| e.to_string())?;
    Message::from_vec(&buf[..n]).map_err(|e| e.to_string())
}

/// DNS over TCP: each message behind a two-byte length (RFC 1035 4.2.2).
async fn ask_tcp(bytes: &[u8], server: SocketAddr) -> Result<Message, String> {
    let mut stream = TcpStream::connect(server)
        .await
        .map_err(|e| e.to_string())?;
    let len = u16::try_from(bytes.len()).map_err(|_| "query too long".to_string())?;
    stream
        .write_all(&len.to_be_bytes())
        .await
        .map_err(|e| e.to_string())?;
    stream.write_all(bytes).await.map_err(|e| e.to_string())?;
    let len = stream.read_u16().await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; usize::from(len)];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(|e| e.to_string())?;
    Message::from_vec(&buf).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::{Record, rdata};

    #[test]
    fn cname_chains_are_followed_within_the_answer() {
        let name = Name::from_ascii("www.example.test.").unwrap();
        let mid = Name::from_ascii("edge.cdn.test.").unwrap();
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.add_answer(Record::from_rdata(
            name.clone(),
            30,
            RData::CNAME(rdata::CNAME(mid.clone())),
        ));
        m.add_answer(Record::from_rdata(
            mid,
            60,
            RData::A(rdata::A("192.0.2.7".parse().unwrap())),
        ));
        m.add_answer(Record::from_rdata(
            Name::from_ascii("unrelated.test.").unwrap(),
            60,
            RData::A(rdata::A("192.0.2.99".parse().unwrap())),
        ));
        let got = addresses(&m, &name);
        assert_eq!(
            got,
            vec![Addr {
                ip: "192.0.2.7".parse().unwrap(),
                ttl: 60
            }]
        );
    }

    #[tokio::test]
    async fn a_dead_upstream_is_an_error_not_a_hang() {
        // Nothing listens on 127.0.0.53:1 in tests; the bound is only against a hang.
        let server: SocketAddr = "127.0.0.53:1".parse().unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), lookup("x.test", &[server])).await;
        assert!(matches!(r, Ok(Err(DnsError::Failed { .. }))), "{r:?}");
    }
}
