//! What both servers share: finding the system's binaries, picking free ports, running a
//! command that must succeed, and polling for a state with a deadline.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a server may take to accept connections before the start counts as failed.
/// Generous because the machine may be busy compiling; a healthy start takes well under
/// 5 s.
pub(crate) const READY_DEADLINE: Duration = Duration::from_secs(30);

/// Between two readiness probes. Each probe spawns a client, so polling much faster
/// would mostly burn the CPU the server needs to start.
const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// How often a start is retried on a new port when another process took the port between
/// [`free_port`] and the server's bind.
pub(crate) const PORT_ATTEMPTS: usize = 3;

pub(crate) const INSTALL_HINT: &str = "scripts/test installs postgresql and mariadb-server \
     (or run: apt-get install -y postgresql mariadb-server)";

/// A port on 127.0.0.1 that nothing listened on a moment ago.
///
/// The OS picks it (bind to port 0), so it is outside the range of well-known servers
/// such as the machine's own PostgreSQL (5432) and MariaDB (3306). Ports already handed
/// out by this process are never handed out again, so parallel tests in one binary do not
/// collide; a collision with another process remains possible, and the servers here
/// retry on a new port when their bind fails.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    loop {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .unwrap_or_else(|e| panic!("cannot bind a TCP port on 127.0.0.1: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("cannot read the address of a bound listener: {e}"))
            .port();
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// Whether this process runs as root (effective uid 0), read from `/proc/self/status` so
/// that the crate needs no libc binding.
pub(crate) fn is_root() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().nth(1))
        .is_some_and(|effective| effective == "0")
}

/// The first `name` found in `dirs`, then in `PATH`.
pub(crate) fn find_binary(name: &str, dirs: &[PathBuf]) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    dirs.iter()
        .chain(path_dirs.iter())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Runs a command to completion, feeding `stdin`, and panics with its output unless it
/// exits 0. `what` names the step for the panic message.
pub(crate) fn run(command: &mut Command, stdin: &str, what: &str) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot run {command:?}: {e}"));
    // Writing all of stdin before reading is safe for the short scripts tests send; a
    // script larger than the pipe buffer whose output also fills its pipe would stall, so
    // the write happens on its own thread.
    let mut pipe = child.stdin.take().expect("stdin was piped");
    let input = stdin.to_owned();
    let output = std::thread::scope(|scope| {
        let writer = scope.spawn(move || pipe.write_all(input.as_bytes()));
        let output = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("{what}: cannot wait for {command:?}: {e}"));
        // A client that exits early (on an error) closes its stdin; that failure is
        // reported through the exit status below, not as a broken pipe.
        let _ = writer.join();
        output
    });
    if !output.status.success() {
        panic!(
            "{what} failed ({}): {command:?}\n--- stderr ---\n{}\n--- stdout ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout),
        );
    }
    output
}

/// Runs a command quietly and says whether it exited 0; for probes.
pub(crate) fn succeeds(command: &mut Command) -> bool {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The outcome of one readiness probe.
pub(crate) enum Probe {
    Ready,
    NotYet,
    /// The server cannot become ready (it exited); stop polling.
    Failed(String),
}

/// Probes until ready, failed, or past the deadline; the error says which.
pub(crate) fn poll_until(
    deadline: Duration,
    mut probe: impl FnMut() -> Probe,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        match probe() {
            Probe::Ready => return Ok(()),
            Probe::Failed(why) => return Err(why),
            Probe::NotYet if start.elapsed() >= deadline => {
                return Err(format!("not ready after {deadline:?}"));
            }
            Probe::NotYet => std::thread::sleep(POLL_INTERVAL),
        }
    }
}

/// A file's text for a panic message; a missing log says so instead of hiding the panic.
pub(crate) fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

/// Removes one trailing newline group, so that a single value reads as `"1"`.
pub(crate) fn stdout_text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout)
        .trim_end_matches(['\n', '\r'])
        .to_owned()
}

/// `chown -R user: path`, for directories a server running as `user` must own.
pub(crate) fn chown_recursive(user: &str, path: &Path) {
    run(
        Command::new("chown").args([
            OsStr::new("-R"),
            OsStr::new(&format!("{user}:")),
            path.as_os_str(),
        ]),
        "",
        &format!("giving {} to the {user} user", path.display()),
    );
}

/// Path of one of the workspace's binaries (`ledger-node`, `stillpoint`), next to the
/// running test executable (target/debug/deps/… → target/debug/NAME).
pub fn workspace_binary(name: &str) -> PathBuf {
    let mut directory = std::env::current_exe().expect("test executable path");
    directory.pop();
    if directory.ends_with("deps") {
        directory.pop();
    }
    let path = directory.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// Whether this process runs as root (its effective uid, from /proc).
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|uids| uids.split_whitespace().nth(1).map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}
