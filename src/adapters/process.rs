//! Child processes the adapters run — `pg_dump`, `pg_restore`, the `mariadb` client and
//! exec hooks — and the rules they all keep: no child outlives the value that owns it
//! (`kill_on_drop`, and for `sh -c` hooks the whole process group), every child is
//! reaped, and stderr is always drained (bounded) so a chatty child can never block on
//! a full pipe while we read its stdout or feed its stdin. A child is done when it
//! exits: a process it left in the background holding a pipe never keeps us waiting.

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::ByteStream;

/// How much of a child's stderr (or of an exec cut's stdout) is kept for error
/// messages and markers. The rest is read and discarded.
pub(crate) const OUTPUT_LIMIT: usize = 64 * 1024;

/// Bytes read from a pipe, at most `limit` of them kept.
pub(crate) struct Bounded {
    pub bytes: Vec<u8>,
    pub truncated: bool,
}

impl Bounded {
    fn new() -> Self {
        Bounded {
            bytes: Vec::new(),
            truncated: false,
        }
    }

    /// Keeps what fits under `limit` of `data`, notes whether anything was cut.
    fn push(&mut self, data: &[u8], limit: usize) {
        let room = limit.saturating_sub(self.bytes.len());
        if data.len() > room {
            self.truncated = true;
        }
        self.bytes.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// Lossy UTF-8, trimmed: what goes into messages and markers.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).trim().to_owned()
    }
}

/// Reads `pipe`, keeping the first `limit` bytes (and reading on past them, so a child
/// that writes more than a pipe holds never blocks), until it closes or until `exited`
/// is cancelled (the child has exited), and then only what the pipe already holds. A background
/// process the child started (`helper &` in a hook) inherits the pipe and may hold it
/// open long after the child exited: waiting for it to close could wait forever.
pub(crate) async fn read_bounded_until<R: AsyncRead + Unpin + std::os::fd::AsFd>(
    mut pipe: R,
    limit: usize,
    exited: CancellationToken,
) -> io::Result<Bounded> {
    let mut bounded = Bounded::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            read = pipe.read(&mut buf) => match read? {
                0 => return Ok(bounded),
                n => bounded.push(&buf[..n], limit),
            },
            () = exited.cancelled() => {
                read_what_is_there(&pipe, &mut bounded, limit)?;
                return Ok(bounded);
            }
        }
    }
}

/// Waits for `child` (spawned with stdout and stderr piped) while reading both pipes,
/// keeping `limit` bytes of each, and returns as soon as the child itself has exited.
///
/// A background process the child started (`helper &` in a hook) inherits the pipes
/// and may hold them open long after the child exited, so waiting for the pipes to
/// close could wait forever. Once the child has exited, everything it wrote is
/// already in the pipes: that is read without waiting, and the pipes are let go.
pub(crate) async fn wait_with_output(
    child: &mut Child,
    limit: usize,
) -> io::Result<(ExitStatus, Bounded, Bounded)> {
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let (mut out, mut err) = (Bounded::new(), Bounded::new());
    let (mut out_open, mut err_open) = (true, true);
    let mut out_buf = vec![0u8; 16 * 1024];
    let mut err_buf = vec![0u8; 16 * 1024];
    // Reads and `wait` are cancel-safe: a read that loses the race loses no bytes.
    let status = loop {
        tokio::select! {
            read = stdout.read(&mut out_buf), if out_open => match read? {
                0 => out_open = false,
                n => out.push(&out_buf[..n], limit),
            },
            read = stderr.read(&mut err_buf), if err_open => match read? {
                0 => err_open = false,
                n => err.push(&err_buf[..n], limit),
            },
            status = child.wait() => break status?,
        }
    };
    if out_open {
        read_what_is_there(&stdout, &mut out, limit)?;
    }
    if err_open {
        read_what_is_there(&stderr, &mut err, limit)?;
    }
    Ok((status, out, err))
}

/// Reads what a pipe holds now, without waiting for more: the pipe is non-blocking
/// (tokio made it so), and a duplicate of its descriptor shares that.
fn read_what_is_there(
    pipe: &impl std::os::fd::AsFd,
    into: &mut Bounded,
    limit: usize,
) -> io::Result<()> {
    use std::io::Read as _;
    let mut file = std::fs::File::from(pipe.as_fd().try_clone_to_owned()?);
    let mut buf = vec![0u8; 16 * 1024];
    // A helper that keeps writing must not keep us here: what the exited child wrote
    // fits in a pipe, so a few pipes' worth is plenty.
    let mut budget = 16 * buf.len();
    while budget > 0 {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                into.push(&buf[..n], limit);
                budget = budget.saturating_sub(n);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Describes how a child ended, with its stderr, for an error message.
pub(crate) fn describe_failure(what: &str, status: ExitStatus, stderr: &str) -> String {
    let status = match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => format!("was killed ({status})"),
    };
    if stderr.is_empty() {
        format!("{what} {status} (no stderr)")
    } else {
        format!("{what} {status}: {stderr}")
    }
}

/// Kills a child's whole process group when dropped, unless the child was reaped first.
///
/// `sh -c` hooks start grandchildren (pipelines, `sleep`, a backgrounded helper);
/// killing only `sh` would orphan them, and they would keep our pipes open. The child
/// must have been spawned with `process_group(0)` so that its pid is its group id.
pub(crate) struct GroupKiller {
    pgid: Option<u32>,
}

impl GroupKiller {
    pub fn new(child: &Child) -> Self {
        GroupKiller { pgid: child.id() }
    }

    /// The leader was reaped normally: leave whatever is left of the group alone
    /// (a hook may deliberately start a long-lived helper).
    pub fn disarm(&mut self) {
        self.pgid = None;
    }

    /// Kills the group now.
    pub async fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            let _ = Command::new("sh")
                .args(kill_group_args(pgid))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            // Drop cannot await; `kill` is a shell builtin that returns at once, so
            // blocking this thread for the fork is brief.
            let _ = std::process::Command::new("sh")
                .args(kill_group_args(pgid))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `sh` arguments that SIGKILL process group `pgid` with the shell's `kill` builtin,
/// because signalling a group from Rust needs libc and this crate forbids `unsafe`.
fn kill_group_args(pgid: u32) -> [String; 4] {
    [
        "-c".to_owned(),
        "kill -s KILL -- \"-$1\" 2>/dev/null".to_owned(),
        "sh".to_owned(),
        pgid.to_string(),
    ]
}

/// Sends `signal` (a name: `INT`, `TERM`, `KILL`) to process `pid` with the shell's
/// `kill` builtin, as [`GroupKiller`] does. Only for a pid that is our own child and
/// not yet reaped, which no other process can have been given. Says whether `kill`
/// succeeded.
pub(crate) async fn send_signal(pid: u32, signal: &str) -> bool {
    Command::new("sh")
        .args(["-c", "kill -s \"$1\" -- \"$2\" 2>/dev/null", "sh", signal])
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|status| status.success())
}

/// A running child whose stdout has been handed out as a copy stream.
pub(crate) struct Producer {
    what: String,
    child: Child,
    stderr: AbortOnDropHandle<io::Result<Bounded>>,
    /// Cancelled once the child has exited: stderr is then read no further than what
    /// it holds.
    exited: CancellationToken,
    group: Option<GroupKiller>,
}

/// Spawns `cmd` with stdout as the returned stream. `cmd` is set to be killed when the
/// [`Producer`] is dropped, so a copy abandoned half-way leaves no child behind. With
/// `own_group` the child gets its own process group and the whole group is killed.
pub(crate) fn spawn_producer(
    cmd: Command,
    what: &str,
    own_group: bool,
) -> io::Result<(ByteStream, Producer)> {
    spawn_producer_logging(cmd, what, own_group, None)
}

/// [`spawn_producer`], with the child's stderr written whole to `log` instead of
/// kept bounded in memory: for a child that reports what the caller needs at the
/// end of a long log (mariadb-backup prints a line per file copied, then the binlog
/// position). [`Producer::wait_stderr`] then returns nothing; the caller reads `log`.
pub(crate) fn spawn_producer_logging(
    mut cmd: Command,
    what: &str,
    own_group: bool,
    log: Option<std::fs::File>,
) -> io::Result<(ByteStream, Producer)> {
    let logged = log.is_some();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log.map_or_else(Stdio::piped, Stdio::from))
        .kill_on_drop(true);
    if own_group {
        cmd.process_group(0);
    }
    let mut child = cmd.spawn()?;
    let group = own_group.then(|| GroupKiller::new(&child));
    let stdout = ExitAware::new(
        child.stdout.take().expect("stdout is piped"),
        child.id(),
        what,
    );
    // The stream's reader polls stdout only, so stderr needs its own task; the handle
    // is awaited in `wait` and the task is aborted if the Producer is dropped.
    let exited = CancellationToken::new();
    let stderr = match child.stderr.take() {
        Some(stderr) => AbortOnDropHandle::new(tokio::spawn(read_bounded_until(
            stderr,
            OUTPUT_LIMIT,
            exited.clone(),
        ))),
        None => {
            debug_assert!(logged, "stderr is piped unless logged");
            AbortOnDropHandle::new(tokio::spawn(async { Ok(Bounded::new()) }))
        }
    };
    Ok((
        Box::pin(stdout),
        Producer {
            what: what.to_owned(),
            child,
            stderr,
            exited,
            group,
        },
    ))
}

/// How often a copy stream that waits for data checks whether its child has exited.
const EXIT_CHECK: Duration = Duration::from_millis(500);
/// How long after its child exited a copy stream may stay open without data before
/// it is taken as held by a process left in the background.
const HELD_AFTER_EXIT: Duration = Duration::from_secs(5);

/// A child's stdout, as a copy stream, that does not wait forever for an end that
/// will not come: a process the child started in the background (`helper &` in a
/// hook) inherits stdout, and the stream ends only when that one exits too, which may
/// be never. When the child has exited and the pipe has stayed empty and open for
/// [`HELD_AFTER_EXIT`], the read fails, saying why: it cannot be told whether the copy
/// is complete, and a copy that might be cut short must not pass for a whole one.
struct ExitAware<R> {
    inner: R,
    what: String,
    /// Our child's pid: not reaped while the stream is read (`Producer::wait` reaps
    /// it afterwards), so it cannot name another process.
    pid: Option<u32>,
    timer: Pin<Box<tokio::time::Sleep>>,
    exited_at: Option<tokio::time::Instant>,
}

impl<R> ExitAware<R> {
    fn new(inner: R, pid: Option<u32>, what: &str) -> Self {
        ExitAware {
            inner,
            what: what.to_owned(),
            pid,
            timer: Box::pin(tokio::time::sleep(EXIT_CHECK)),
            exited_at: None,
        }
    }
}

/// Whether our unreaped child `pid` has exited (a zombie, or gone).
fn has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for ExitAware<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        if let Poll::Ready(read) = Pin::new(&mut this.inner).poll_read(cx, buf) {
            return Poll::Ready(read);
        }
        let Some(pid) = this.pid else {
            return Poll::Pending;
        };
        // Nothing to read now: check on the child every EXIT_CHECK while we wait.
        while this.timer.as_mut().poll(cx).is_ready() {
            if has_exited(pid) {
                let now = tokio::time::Instant::now();
                let exited_at = *this.exited_at.get_or_insert(now);
                if now.duration_since(exited_at) >= HELD_AFTER_EXIT {
                    return Poll::Ready(Err(io::Error::other(format!(
                        "{} exited, but a process it started in the background still \
                         holds its stdout {}s later, so the end of the copy cannot be \
                         told; redirect that process's output (`helper >/dev/null 2>&1 &`)",
                        this.what,
                        HELD_AFTER_EXIT.as_secs()
                    ))));
                }
            }
            this.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + EXIT_CHECK);
        }
        Poll::Pending
    }
}

impl Producer {
    /// Waits for the child to exit; `Err` carries its exit status and stderr.
    pub async fn wait(self) -> Result<(), String> {
        self.wait_stderr().await.map(|_| ())
    }

    /// [`Producer::wait`], also returning what the child wrote to stderr when it
    /// succeeded (pg_basebackup reports its WAL positions there).
    pub async fn wait_stderr(mut self) -> Result<String, String> {
        let status = self
            .child
            .wait()
            .await
            .map_err(|e| format!("waiting for {}: {e}", self.what))?;
        self.exited.cancel();
        if let Some(group) = self.group.as_mut() {
            group.disarm();
        }
        let stderr = match (&mut self.stderr).await {
            Ok(Ok(b)) => b.text(),
            Ok(Err(e)) => format!("(reading its stderr failed: {e})"),
            Err(e) => format!("(reading its stderr failed: {e})"),
        };
        if status.success() {
            Ok(stderr)
        } else {
            Err(describe_failure(&self.what, status, &stderr))
        }
    }
}

/// Runs `cmd` with `input` on its stdin until it exits. `Err` says whether the child
/// failed (status + stderr), or reading `input` failed, or the child stopped reading
/// early although it exited 0.
pub(crate) async fn run_with_stdin(
    mut cmd: Command,
    what: &str,
    input: ByteStream,
    own_group: bool,
) -> Result<(), String> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if own_group {
        cmd.process_group(0);
    }
    let mut child = cmd.spawn().map_err(|e| format!("starting {what}: {e}"))?;
    let mut group = own_group.then(|| GroupKiller::new(&child));
    let stdin = child.stdin.take().expect("stdin is piped");
    let stderr = child.stderr.take().expect("stderr is piped");

    // Read alongside the feeding (a child blocked on a full stderr pipe would never
    // read its stdin), and only until the child has exited.
    let exited = CancellationToken::new();
    let stderr = AbortOnDropHandle::new(tokio::spawn(read_bounded_until(
        stderr,
        OUTPUT_LIMIT,
        exited.clone(),
    )));
    let fed = feed(input, stdin).await;
    if let Err(Feed::Source(e)) = &fed {
        // Our input broke: the child must not commit a partial restore as if it
        // were whole, so it is killed rather than left to see a clean EOF.
        if let Some(group) = group.as_mut() {
            group.kill().await;
        }
        let _ = child.start_kill();
        let _ = child.wait().await;
        return Err(format!("reading the copy to feed {what} failed: {e}"));
    }
    let status = child
        .wait()
        .await
        .map_err(|e| format!("waiting for {what}: {e}"))?;
    exited.cancel();
    if let Some(group) = group.as_mut() {
        group.disarm();
    }
    let stderr = match stderr.await {
        Ok(Ok(bytes)) => bytes.text(),
        Ok(Err(e)) => format!("(reading its stderr failed: {e})"),
        Err(e) => format!("(reading its stderr failed: {e})"),
    };
    if !status.success() {
        return Err(describe_failure(what, status, &stderr));
    }
    match fed {
        Ok(()) => Ok(()),
        Err(Feed::Source(_)) => unreachable!("handled above"),
        Err(Feed::Sink(e)) => Err(format!(
            "{what} exited 0 but stopped reading its input early ({e}); the restore is incomplete"
        )),
    }
}

enum Feed {
    /// Reading the copy failed.
    Source(io::Error),
    /// Writing to the child failed (it exited or closed stdin).
    Sink(io::Error),
}

/// Copies `input` into the child's stdin and closes it. Read and write errors are kept
/// apart because they mean different things: a broken source vs a child that quit.
async fn feed(mut input: ByteStream, mut stdin: ChildStdin) -> Result<(), Feed> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = input.read(&mut buf).await.map_err(Feed::Source)?;
        if n == 0 {
            break;
        }
        stdin.write_all(&buf[..n]).await.map_err(Feed::Sink)?;
    }
    stdin.shutdown().await.map_err(Feed::Sink)?;
    drop(stdin);
    Ok(())
}
