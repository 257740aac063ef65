//! A WAL spool that is filled while a scratch server replays from it.
//!
//! A point restore does not write all the WAL from its base to its point before
//! replay starts: a feeder (`points::restore`) writes each segment here, in replay
//! order, while the base is extracted and while the server replays, and the server's
//! `restore_command` (a small script written here) waits for the segment it asks for.
//! The feeder stays at most [`LOOKAHEAD`] segments ahead of the one the server asked
//! for last, and segments the server has gone past are removed: the spool holds a
//! few segments, not the whole stretch.
//!
//! The protocol, all in this directory:
//! - `expected`: every file name the feeder will write, one a line, written first. A
//!   name not in it is answered "not in the archive" at once (the server probes for
//!   timeline history files that do not exist), never waited for.
//! - each file appears whole, by a rename; `done` appears after the last one.
//! - `asked`: the name the server asked for last, written by the script (as the
//!   server's user: the directory is given to it), read by the feeder.
//!
//! The script waits only while the server that ran it lives and the spool is there,
//! so a server stopped (or a restore given up) while it waits leaves no loop behind.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How many segments the feeder may write ahead of the one the server asked for.
pub const LOOKAHEAD: usize = 8;

const SCRIPT: &str = "restore-command";
const EXPECTED: &str = "expected";
const ASKED: &str = "asked";
const DONE: &str = "done";

/// A spool directory, its script, and what the feeder knows of the server's progress.
pub struct Spool {
    dir: PathBuf,
    /// The WAL segments in replay order: look-ahead and clean-up count in it.
    segments: Vec<String>,
    /// One past the index in `segments` of the newest one the server asked for (0:
    /// none yet).
    asked: AtomicUsize,
    /// Segments before this index have been removed.
    removed: AtomicUsize,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("dir", &self.dir).finish()
    }
}

impl Spool {
    /// Makes the spool `dir` (which must not exist) for `others` (timeline history
    /// files) and `segments` (in replay order), with its script. `run_as`: the user
    /// the server runs as, who must be able to write `asked` here.
    pub async fn create(
        dir: &Path,
        others: &[String],
        segments: Vec<String>,
        run_as: Option<&str>,
    ) -> Result<Spool, String> {
        let fail = |what: &str, error: std::io::Error| format!("{what} {}: {error}", dir.display());
        std::fs::create_dir(dir).map_err(|error| fail("creating the WAL spool", error))?;
        let dir = std::fs::canonicalize(dir).map_err(|error| fail("resolving", error))?;
        let mut expected = String::new();
        for name in others.iter().chain(&segments) {
            expected.push_str(name);
            expected.push('\n');
        }
        std::fs::write(dir.join(EXPECTED), expected)
            .map_err(|error| fail("writing the list of expected WAL in", error))?;
        let script = dir.join(SCRIPT);
        std::fs::write(&script, script_text(&dir))
            .map_err(|error| fail("writing the restore_command script in", error))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .map_err(|error| fail("making the restore_command script in", error))?;
        if let Some(user) = run_as {
            super::chown(user, &dir)
                .await
                .map_err(|error| error.to_string())?;
        }
        Ok(Spool {
            dir,
            segments,
            asked: AtomicUsize::new(0),
            removed: AtomicUsize::new(0),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's `restore_command`: the script, with `%f` and `%p`.
    pub fn restore_command(&self) -> String {
        format!("{} %f \"%p\"", super::shell_path(&self.dir.join(SCRIPT)))
    }

    /// Waits until segment `index` (of the replay order) is within [`LOOKAHEAD`] of
    /// the one the server asked for last, removing the segments it has gone past.
    pub async fn wait_for_room(&self, index: usize) {
        loop {
            let asked = self.read_asked();
            self.remove_consumed(asked);
            if index < asked + LOOKAHEAD {
                return;
            }
            // Not a wait for a state in a test: how often the server's progress is read.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Writes `bytes` as the file `name`, which appears whole (written aside, then
    /// renamed).
    pub async fn publish(&self, name: &str, bytes: &[u8]) -> Result<(), String> {
        let aside = self.dir.join(format!(".{name}.partial"));
        tokio::fs::write(&aside, bytes)
            .await
            .map_err(|error| format!("writing {}: {error}", aside.display()))?;
        tokio::fs::rename(&aside, self.dir.join(name))
            .await
            .map_err(|error| format!("renaming {} into place: {error}", aside.display()))
    }

    /// Says that every expected file has been written: the script answers "not in the
    /// archive" for one that is not there instead of waiting.
    pub async fn finish(&self) -> Result<(), String> {
        self.publish(DONE, b"").await
    }

    /// One past the index of the newest segment the server asked for.
    fn read_asked(&self) -> usize {
        // Written by the script while we read: a torn read names nothing we know.
        if let Ok(text) = std::fs::read_to_string(self.dir.join(ASKED))
            && let Some(at) = self.segments.iter().position(|name| name == text.trim())
        {
            self.asked.fetch_max(at + 1, Ordering::Relaxed);
        }
        self.asked.load(Ordering::Relaxed)
    }

    /// Removes the segments before the one before the newest asked for: the server
    /// reads forward, and the one before stays for a record that spans the boundary.
    fn remove_consumed(&self, asked: usize) {
        let until = asked.saturating_sub(2);
        let from = self.removed.fetch_max(until, Ordering::Relaxed);
        for name in self.segments.get(from..until).unwrap_or_default() {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
    }
}

/// The restore_command script for the spool `dir`: `$1` is `%f`, `$2` is `%p`.
fn script_text(dir: &Path) -> String {
    format!(
        r#"#!/bin/sh
# Written by stillpoint: restore_command for a WAL spool filled while replay runs.
d={dir}
# Not among what the spool will hold (a timeline history probe): not in the archive.
grep -qxF -- "$1" "$d/{EXPECTED}" || exit 1
printf '%s\n' "$1" > "$d/{ASKED}"
w=0
while :; do
    if [ -e "$d/$1" ]; then
        # In the server's log: replay outran the feeder (the restore's bottleneck).
        [ $w -gt 0 ] && echo "stillpoint spool: replay waited $w x 20 ms for $1" >&2
        exec cp "$d/$1" "$2"
    fi
    w=$((w+1))
    if [ -e "$d/{DONE}" ]; then
        [ -e "$d/$1" ] && exec cp "$d/$1" "$2"
        exit 1
    fi
    # The server that asked is stopping or gone, or the spool was removed (the
    # restore stopped): stop waiting. It runs us in its data directory.
    kill -0 "$PPID" 2>/dev/null || exit 1
    [ -e postmaster.pid ] && [ -e "$d/{EXPECTED}" ] || exit 1
    sleep 0.02
done
"#,
        dir = super::sh_quote(&dir.display().to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::process::Command;

    const A: &str = "000000010000000000000003";
    const B: &str = "000000010000000000000004";

    /// The script as PostgreSQL runs it (`sh -c` with %f and %p replaced), in a
    /// directory that stands for the data directory.
    fn fetch(spool: &Spool, data_dir: &Path, name: &str) -> tokio::process::Child {
        let mut command = String::new();
        let template = spool.restore_command();
        let mut chars = template.chars();
        // As PostgreSQL expands it: %f, %p, and %% for a `%`.
        while let Some(c) = chars.next() {
            if c != '%' {
                command.push(c);
                continue;
            }
            match chars.next() {
                Some('f') => command.push_str(name),
                Some('p') => command.push_str("RECOVERYXLOG"),
                Some('%') => command.push('%'),
                other => panic!("unexpected %{other:?} in {template}"),
            }
        }
        Command::new("sh")
            .args(["-c", &command])
            .current_dir(data_dir)
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    /// The script's exit, which must come within seconds: it must not wait for ever.
    async fn exits(mut script: tokio::process::Child) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(10), script.wait())
            .await
            .expect("the script must not wait for ever here")
            .unwrap()
    }

    /// The restore_command waits for a segment that is coming and copies it once it
    /// is there; a name the spool will never hold is "not there" at once (a history
    /// probe must not wait for the whole spool), and so is a segment missing once the
    /// spool is done. Its path may hold quotes and percent signs.
    #[tokio::test]
    async fn restore_command_waits_only_for_what_is_coming() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        std::fs::create_dir(&data_dir).unwrap();
        std::fs::write(data_dir.join("postmaster.pid"), b"1\n").unwrap();
        let spool = Spool::create(
            &dir.path().join("it's 100%f"),
            &["00000002.history".to_owned()],
            vec![A.to_owned(), B.to_owned()],
            None,
        )
        .await
        .unwrap();

        let status = exits(fetch(&spool, &data_dir, "00000003.history")).await;
        assert_eq!(status.code(), Some(1), "not expected: not in the archive");

        let mut waiting = fetch(&spool, &data_dir, A);
        // It asked, and waits: it has not exited while nothing is there.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(spool.dir().join(ASKED)).is_ok_and(|asked| asked.trim() == A)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the script never asked"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            waiting.try_wait().unwrap().is_none(),
            "it must wait for {A}"
        );
        spool.publish(A, b"segment a").await.unwrap();
        assert!(exits(waiting).await.success());
        assert_eq!(
            std::fs::read(data_dir.join("RECOVERYXLOG")).unwrap(),
            b"segment a"
        );

        spool.finish().await.unwrap();
        let status = exits(fetch(&spool, &data_dir, B)).await;
        assert_eq!(
            status.code(),
            Some(1),
            "done without it: not in the archive"
        );
    }

    /// A waiting script gives up when the server stops (its postmaster.pid goes), so
    /// no loop outlives a stopped recovery.
    #[tokio::test]
    async fn restore_command_stops_waiting_when_the_server_stops() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("postmaster.pid"), b"1\n").unwrap();
        let spool = Spool::create(&dir.path().join("wal"), &[], vec![A.to_owned()], None)
            .await
            .unwrap();
        let waiting = fetch(&spool, dir.path(), A);
        std::fs::remove_file(dir.path().join("postmaster.pid")).unwrap();
        let status = exits(waiting).await;
        assert_eq!(status.code(), Some(1));
    }

    /// The feeder stays within LOOKAHEAD segments of the one asked for, and removes
    /// those replay has gone past (keeping the one before the asked one).
    #[tokio::test]
    async fn the_feeder_stays_a_bounded_distance_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..LOOKAHEAD + 4).map(|n| format!("{n:024X}")).collect();
        let spool = Spool::create(&dir.path().join("wal"), &[], names.clone(), None)
            .await
            .unwrap();
        for (index, name) in names.iter().take(LOOKAHEAD).enumerate() {
            spool.wait_for_room(index).await;
            spool.publish(name, b"x").await.unwrap();
        }
        // Nothing asked yet: the next one must wait.
        let blocked =
            tokio::time::timeout(Duration::from_millis(200), spool.wait_for_room(LOOKAHEAD)).await;
        assert!(
            blocked.is_err(),
            "segment {LOOKAHEAD} was let ahead of the bound"
        );
        std::fs::write(spool.dir().join(ASKED), format!("{}\n", names[3])).unwrap();
        tokio::time::timeout(Duration::from_secs(5), spool.wait_for_room(LOOKAHEAD + 3))
            .await
            .expect("asking for segment 3 makes room up to 3 + LOOKAHEAD");
        for (index, name) in names.iter().take(LOOKAHEAD).enumerate() {
            assert_eq!(
                spool.dir().join(name).exists(),
                index >= 2,
                "segment {index} (asked: 3)"
            );
        }
    }
}
