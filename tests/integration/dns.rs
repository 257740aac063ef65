//! A tiny DNS server on loopback UDP that answers one SRV name, so SRV resolution is
//! tested against a real resolver talking real DNS, without touching the system's.

use std::net::SocketAddr;

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::rdata::SRV;
use hickory_proto::rr::{Name, RData, Record, RecordType};

pub struct SrvServer {
    pub address: SocketAddr,
    _runtime: tokio::runtime::Runtime,
}

impl SrvServer {
    /// Answers `name` with one SRV record per target port, all on `localhost`.
    pub fn start(name: &str, ports: &[u16]) -> Self {
        Self::start_with_target(name, ports, "localhost.")
    }

    /// Like [`Self::start`], with every record pointing at `target` (e.g. `.`).
    pub fn start_with_target(name: &str, ports: &[u16], target: &str) -> Self {
        let target = Name::from_ascii(target).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let socket = runtime
            .block_on(tokio::net::UdpSocket::bind("127.0.0.1:0"))
            .unwrap();
        let address = socket.local_addr().unwrap();
        let name = Name::from_ascii(name).unwrap();
        let ports = ports.to_vec();
        runtime.spawn(async move {
            let mut buffer = vec![0u8; 4096];
            loop {
                let Ok((length, peer)) = socket.recv_from(&mut buffer).await else {
                    return;
                };
                let Ok(query) = Message::from_vec(&buffer[..length]) else {
                    continue;
                };
                let mut answer = query.clone();
                answer.metadata.message_type = MessageType::Response;
                answer.metadata.authoritative = true;
                let asks_for_srv = query.queries.iter().any(|question| {
                    question.query_type() == RecordType::SRV && question.name() == &name
                });
                if asks_for_srv {
                    for (priority, port) in ports.iter().enumerate() {
                        let srv = SRV::new(priority as u16, 10, *port, target.clone());
                        answer.add_answer(Record::from_rdata(name.clone(), 60, RData::SRV(srv)));
                    }
                }
                if let Ok(bytes) = answer.to_vec() {
                    let _ = socket.send_to(&bytes, peer).await;
                }
            }
        });
        Self {
            address,
            _runtime: runtime,
        }
    }
}
