//! Network faults with tc on loopback. The service reaches each node's admin port, and
//! the storage, at an address of its own (127.0.0.11 and up). A fault sends the packets
//! between that address and 127.0.0.1 (where the service's connections come from) into
//! an htb class that passes almost nothing (a partition: TCP retransmits into the void,
//! as across a cut link) or one limited to a slow rate (a storage answering slowly).
//! Clients use the nodes' application ports on 127.0.0.1, and the run's own observer
//! connects from 127.0.0.2, so neither is touched: only the path between the service
//! and that one peer is.
//!
//! Why htb and not netem: this machine's kernel has no netem (nor prio, nor tc
//! actions); htb, u32 filters and pfifo are what it offers. So a "delay" is a shaped
//! rate, not a fixed latency.
//!
//! The rules live on `lo` of this machine until dropped; a run killed outright leaves
//! them, and the next run removes them before it installs its own.

use std::net::Ipv4Addr;
use std::process::Command;

/// Where the service's connections come from.
const SERVICE_SIDE: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Where the run's observer connects from: outside every lane.
pub const OBSERVER_SIDE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The rate of a slow lane: 400 kbit/s, 50 KB/s.
const SLOW_RATE: &str = "400kbit";

/// The network of this run: which peers may be cut off or slowed.
pub struct Lanes {
    peers: Vec<Ipv4Addr>,
}

fn tc(args: &str) -> Result<(), String> {
    let output = Command::new("tc")
        .args(args.split_whitespace())
        .output()
        .map_err(|e| format!("tc {args}: {e} (scripts/install-packages installs iproute2)"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "tc {args}: {} (the nemesis needs root or CAP_NET_ADMIN for its network faults)",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// What a lane does to its packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Open,
    Cut,
    Slow,
}

impl Lanes {
    /// All open: the default class passes everything at full speed.
    pub fn install(peers: &[Ipv4Addr]) -> Result<Lanes, String> {
        // A killed earlier run's rules, if any.
        let _ = tc("qdisc del dev lo root");
        let lanes = Lanes {
            peers: peers.to_vec(),
        };
        tc("qdisc add dev lo root handle 1: htb default 1 r2q 1000")?;
        tc("class add dev lo parent 1: classid 1:1 htb rate 100gbit")?;
        // 8 bit/s and a queue of one packet: nothing gets through in time.
        tc("class add dev lo parent 1: classid 1:2 htb rate 8bit ceil 8bit")?;
        tc("qdisc add dev lo parent 1:2 handle 20: pfifo limit 1")?;
        tc(&format!(
            "class add dev lo parent 1: classid 1:3 htb rate {SLOW_RATE} ceil {SLOW_RATE}"
        ))?;
        Ok(lanes)
    }

    /// Sends the packets between the service and `peer` into `lane`.
    pub fn set(&self, peer: Ipv4Addr, lane: Lane) {
        let index = self
            .peers
            .iter()
            .position(|p| *p == peer)
            .unwrap_or_else(|| panic!("no lane for {peer}"));
        // Each peer's filters have a priority of their own, so they go in one command.
        let prio = 10 + index;
        let _ = tc(&format!("filter del dev lo parent 1: prio {prio}"));
        let class = match lane {
            Lane::Open => return,
            Lane::Cut => "1:2",
            Lane::Slow => "1:3",
        };
        for (src, dst) in [(SERVICE_SIDE, peer), (peer, SERVICE_SIDE)] {
            tc(&format!(
                "filter add dev lo parent 1: protocol ip prio {prio} u32 match ip src {src}/32 \
                 match ip dst {dst}/32 flowid {class}"
            ))
            .unwrap();
        }
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        let _ = tc("qdisc del dev lo root");
    }
}
