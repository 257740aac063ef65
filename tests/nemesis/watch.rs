//! Every point the moment it is listed: what a restore of it needs (its base backup,
//! and the archive from the base to its marker without a gap) looked up in the
//! storage at once, by the code a restore runs first (`points::restore::needs`). The
//! drills and `verify` at the end of a run come after the archives have caught up,
//! so they cannot see a point listed before its archive reached it; this can. Each
//! look goes into the history as `point_seen`, which the checker reads.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::json;
use stillpoint::archive::Archive;
use stillpoint::points::restore::{needs, restores_from_base};
use stillpoint::points::{POINT_MANIFEST, POINTS_DIR, read_point};

use crate::history::History;
use crate::store::{self, PATIENCE};

pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    pub fn start(runbook: &Path, history: Arc<History>) -> Watcher {
        let (storage, settings) = store::open(runbook);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let runtime = store::runtime();
            let mut seen = BTreeSet::new();
            while !stopping.load(Ordering::Relaxed) {
                let look = runtime.block_on(async {
                    tokio::time::timeout(PATIENCE, async {
                        let listing = storage.list(POINTS_DIR).await.ok()?;
                        for entry in listing {
                            let Some(id) = entry
                                .path
                                .strip_prefix(&format!("{POINTS_DIR}/"))
                                .and_then(|rest| rest.strip_suffix(&format!("/{POINT_MANIFEST}")))
                            else {
                                continue;
                            };
                            if seen.contains(id) {
                                continue;
                            }
                            let point = read_point(&storage, id).await.ok()?;
                            let mut problems = Vec::new();
                            for database in &point.databases {
                                if !restores_from_base(&database.adapter) {
                                    continue;
                                }
                                // The storage answering at all (not stopped or slowed by a
                                // fault): otherwise the point is looked at again later.
                                Archive::new(storage.clone(), settings.clone(), &database.name)
                                    .ok()?
                                    .catalog()
                                    .await
                                    .ok()?;
                                if let Err(error) =
                                    needs(&storage, &settings, &point, &database.name).await
                                {
                                    problems.push(error.to_string());
                                }
                            }
                            history.log(
                                "point_seen",
                                json!({
                                    "point_id": id,
                                    "listed_ms": entry.last_modified.timestamp_millis(),
                                    "problems": problems,
                                }),
                            );
                            seen.insert(id.to_owned());
                        }
                        Some(())
                    })
                    .await
                });
                if look.is_err() {
                    history.log("watch_slow", json!({ "timeout_s": PATIENCE.as_secs() }));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Watcher {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
