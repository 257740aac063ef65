//! Refused admin calls in the log, without flooding it. A client that hammers a node
//! with a wrong token would otherwise write one `warn` line per call; an operator needs
//! to know that it happens, from whom, why, and how often.
//!
//! The first refusal of a peer (its IP address: a client that reconnects gets a new
//! port) for a reason is logged at once, as before. Further refusals of that peer for
//! that reason are counted, and the count is logged at most once per [`INTERVAL`]: with
//! the first refusal (of any peer) after the interval has passed, or when the server
//! stops (the log is dropped with the admin services). A peer quiet for a whole interval
//! is forgotten, so its next refusal is logged at once again.
//!
//! Memory is bounded: at most [`MAX_TRACKED`] peer/reason pairs are tracked; refusals
//! from peers beyond them are counted together, under `peer=untracked`.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one line per peer and reason in this long.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// How many peer/reason pairs are tracked one by one.
pub const MAX_TRACKED: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Peer {
    Ip(IpAddr),
    /// The connection did not say (not served over TCP).
    Unknown,
    /// Beyond [`MAX_TRACKED`]: counted together.
    Untracked,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Ip(ip) => ip.fmt(f),
            Peer::Unknown => f.write_str("unknown"),
            Peer::Untracked => f.write_str("untracked"),
        }
    }
}

struct Entry {
    /// When this pair's current interval began: its first refusal, or its last
    /// summary line.
    since: Instant,
    /// Refusals in the current interval not logged yet.
    unlogged: u64,
    last_method: String,
}

/// A summary line that is due, written after the lock is let go.
struct Due {
    peer: Peer,
    reason: &'static str,
    refused: u64,
    last_method: String,
    over: Duration,
}

#[derive(Debug)]
pub(crate) struct RefusalLog {
    state: Mutex<State>,
    interval: Duration,
    max_tracked: usize,
}

struct State {
    entries: HashMap<(Peer, &'static str), Entry>,
    /// No entry's interval ends before this: refusals until then skip the sweep.
    next_due: Option<Instant>,
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("tracked", &self.entries.len())
            .finish()
    }
}

impl Default for RefusalLog {
    fn default() -> Self {
        RefusalLog::new(INTERVAL, MAX_TRACKED)
    }
}

impl RefusalLog {
    pub(crate) fn new(interval: Duration, max_tracked: usize) -> Self {
        RefusalLog {
            state: Mutex::new(State {
                entries: HashMap::new(),
                next_due: None,
            }),
            interval,
            max_tracked,
        }
    }

    /// Notes one refused call, and logs what is due.
    pub(crate) fn refused(&self, peer: Option<SocketAddr>, method: &str, reason: &'static str) {
        self.refused_at(peer, method, reason, Instant::now());
    }

    pub(crate) fn refused_at(
        &self,
        peer: Option<SocketAddr>,
        method: &str,
        reason: &'static str,
        now: Instant,
    ) {
        let (due, first) = {
            let mut state = self
                .state
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            let due = self.sweep(&mut state, now);
            let mut key = (
                peer.map_or(Peer::Unknown, |peer| Peer::Ip(peer.ip())),
                reason,
            );
            if !state.entries.contains_key(&key) && state.entries.len() >= self.max_tracked {
                key.0 = Peer::Untracked;
            }
            let first = match state.entries.get_mut(&key) {
                Some(entry) => {
                    entry.unlogged += 1;
                    method.clone_into(&mut entry.last_method);
                    false
                }
                None => {
                    state.entries.insert(
                        key,
                        Entry {
                            since: now,
                            unlogged: 0,
                            last_method: method.to_owned(),
                        },
                    );
                    let ends = now + self.interval;
                    state.next_due = Some(state.next_due.map_or(ends, |next| next.min(ends)));
                    true
                }
            };
            (due, first.then_some(key.0))
        };
        for due in due {
            due.log();
        }
        if let Some(key) = first {
            let peer = match (key, peer) {
                (Peer::Ip(_), Some(peer)) => peer.to_string(),
                (key, _) => key.to_string(),
            };
            tracing::warn!(
                peer = %peer,
                method,
                reason,
                "refused an admin call (more like it from this peer are counted, and logged \
                 at most every {}s)",
                self.interval.as_secs()
            );
        }
    }

    /// Takes the summaries whose interval has ended, restarts those pairs' intervals,
    /// and forgets the pairs that were quiet for a whole interval.
    fn sweep(&self, state: &mut State, now: Instant) -> Vec<Due> {
        if state.next_due.is_none_or(|next| now < next) {
            return Vec::new();
        }
        let mut due = Vec::new();
        let mut next_due = None::<Instant>;
        state.entries.retain(|(peer, reason), entry| {
            let ends = entry.since + self.interval;
            if now < ends {
                next_due = Some(next_due.map_or(ends, |next| next.min(ends)));
                return true;
            }
            if entry.unlogged == 0 {
                return false;
            }
            due.push(Due {
                peer: *peer,
                reason,
                refused: entry.unlogged,
                last_method: std::mem::take(&mut entry.last_method),
                over: now.duration_since(entry.since),
            });
            entry.since = now;
            entry.unlogged = 0;
            let ends = now + self.interval;
            next_due = Some(next_due.map_or(ends, |next| next.min(ends)));
            true
        });
        state.next_due = next_due;
        due
    }
}

impl Due {
    fn log(&self) {
        tracing::warn!(
            peer = %self.peer,
            reason = self.reason,
            refused = self.refused,
            last_method = self.last_method,
            "refused {} more admin call(s) from {} ({}) in the last {}s",
            self.refused,
            self.peer,
            self.reason,
            self.over.as_secs()
        );
    }
}

impl Drop for RefusalLog {
    /// The counts not logged yet, when the admin services stop.
    fn drop(&mut self) {
        let state = self
            .state
            .get_mut()
            .unwrap_or_else(|poison| poison.into_inner());
        let now = Instant::now();
        for ((peer, reason), entry) in state.entries.drain() {
            if entry.unlogged > 0 {
                Due {
                    peer,
                    reason,
                    refused: entry.unlogged,
                    last_method: entry.last_method,
                    over: now.duration_since(entry.since),
                }
                .log();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// The log lines written while `work` runs, through a real fmt subscriber.
    fn captured(work: impl FnOnce()) -> Vec<String> {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, work);
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn peer(text: &str) -> Option<SocketAddr> {
        Some(text.parse().unwrap())
    }

    const WRONG: &str = "wrong bearer token";
    const PAUSE: &str = "/rpc.Admin/Pause";

    /// 100 refusals in a row: one line at once, then one line with the count when the
    /// interval is over, whatever the source port (a client reconnecting gets a new one).
    #[test]
    fn a_hammering_peer_gets_one_line_then_one_count_per_interval() {
        let start = Instant::now();
        let log = RefusalLog::new(INTERVAL, MAX_TRACKED);
        let lines = captured(|| {
            for call in 0..100u16 {
                let at = start + Duration::from_millis(u64::from(call) * 10);
                log.refused_at(
                    peer(&format!("10.0.0.7:{}", 40000 + call)),
                    PAUSE,
                    WRONG,
                    at,
                );
            }
        });
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(lines[0].contains("WARN"), "{lines:#?}");
        assert!(lines[0].contains("refused an admin call"), "{lines:#?}");
        assert!(lines[0].contains("peer=10.0.0.7:40000"), "{lines:#?}");
        assert!(
            lines[0].contains(WRONG) && lines[0].contains(PAUSE),
            "{lines:#?}"
        );

        // The first refusal after the interval brings the count of the other 99.
        let lines = captured(|| {
            log.refused_at(peer("10.0.0.7:41000"), PAUSE, WRONG, start + INTERVAL);
        });
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].contains("refused 99 more admin call(s) from 10.0.0.7 (wrong bearer token)"),
            "{lines:#?}"
        );
        assert!(lines[0].contains("refused=99"), "{lines:#?}");

        // Still hammering: at most one line per interval, each with its count.
        let lines = captured(|| {
            for call in 1..=1000u64 {
                let at = start + INTERVAL + Duration::from_millis(call * 30);
                log.refused_at(peer("10.0.0.7:42000"), PAUSE, WRONG, at);
            }
        });
        // 1000 calls over 30s after the last summary: two intervals end within them
        // (the third's count waits for a later refusal, or the drop below).
        assert_eq!(lines.len(), 2, "{lines:#?}");
        for line in &lines {
            assert!(line.contains("more admin call(s) from 10.0.0.7"), "{line}");
        }
        // What is left is logged when the services stop.
        let lines = captured(|| drop(log));
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].contains("more admin call(s) from 10.0.0.7"),
            "{lines:#?}"
        );
    }

    /// Through the guard's policy, as a node checks calls: 100 calls with a wrong token
    /// from one client, each refused, make one line.
    #[test]
    fn a_hundred_refused_calls_through_the_policy_make_one_line() {
        use crate::grpc::auth::{AdminSecurity, AdminToken, Role};
        let token = AdminToken::parse("op-0123456789abcdef-secret", "test").unwrap();
        let policy = AdminSecurity::default()
            .with_token(&token, Role::Operator)
            .unwrap()
            .policy();
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static("Bearer not-the-token-0123456789"),
        );
        let lines = captured(|| {
            for call in 0..100u16 {
                let mut ext = http::Extensions::new();
                ext.insert(tonic::transport::server::TcpConnectInfo {
                    local_addr: None,
                    remote_addr: peer(&format!("192.0.2.9:{}", 50000 + call)),
                });
                let refused = policy.check(PAUSE, &headers, &ext).unwrap_err();
                assert_eq!(refused.code(), tonic::Code::Unauthenticated);
            }
        });
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(lines[0].contains("peer=192.0.2.9:50000"), "{lines:#?}");
        assert!(!lines[0].contains("not-the-token"), "{lines:#?}");
        let lines = captured(|| drop(policy));
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(lines[0].contains("refused=99"), "{lines:#?}");
    }

    /// Each peer and each reason is told at once; a peer quiet for an interval is told
    /// at once again; nothing is said when nothing more was refused.
    #[test]
    fn each_peer_and_reason_is_told_at_once_and_quiet_peers_are_forgotten() {
        let start = Instant::now();
        let log = RefusalLog::new(INTERVAL, MAX_TRACKED);
        let lines = captured(|| {
            log.refused_at(peer("10.0.0.1:1000"), PAUSE, WRONG, start);
            log.refused_at(peer("10.0.0.2:1000"), PAUSE, WRONG, start);
            log.refused_at(peer("10.0.0.1:1001"), PAUSE, "no bearer token", start);
            log.refused_at(None, PAUSE, WRONG, start);
            log.refused_at(peer("10.0.0.1:1002"), PAUSE, WRONG, start + INTERVAL * 3);
        });
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(
            lines
                .iter()
                .all(|line| line.contains("refused an admin call"))
        );
        assert!(lines[3].contains("peer=unknown"), "{lines:#?}");
        let lines = captured(|| drop(log));
        assert!(lines.is_empty(), "{lines:#?}");
    }

    /// Past the cap, new peers are counted together: memory stays bounded however many
    /// addresses a caller uses.
    #[test]
    fn peers_beyond_the_cap_are_counted_together() {
        let start = Instant::now();
        let log = RefusalLog::new(INTERVAL, 8);
        let lines = captured(|| {
            for host in 0..=255u8 {
                for call in 0..4u16 {
                    log.refused_at(peer(&format!("10.1.0.{host}:{call}")), PAUSE, WRONG, start);
                }
            }
        });
        assert_eq!(lines.len(), 9, "8 peers and the untracked rest: {lines:#?}");
        assert!(lines[8].contains("peer=untracked"), "{lines:#?}");
        assert!(log.state.lock().unwrap().entries.len() <= 9);
        let lines = captured(|| drop(log));
        let untracked = lines
            .iter()
            .find(|line| line.contains("from untracked"))
            .unwrap_or_else(|| panic!("{lines:#?}"));
        // 248 peers × 4 calls, the first of which was told at once.
        assert!(untracked.contains("refused=991"), "{untracked}");
    }
}
