//! Pages as a browser shows them: headless Chromium (Debian's `chromium`, installed by
//! `scripts/install-packages`) loads a URL and prints the DOM it built, for tests of
//! the service's status page.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::running_as_root;

const CHROMIUM: &str = "/usr/bin/chromium";
/// How long a page may take to render.
const DEADLINE: Duration = Duration::from_secs(60);

/// Chromium's stderr without its complaints about a missing D-Bus (no desktop session
/// in a test container): what is left says why a page did not load.
fn chromium_errors(stderr: std::thread::JoinHandle<String>) -> String {
    let text = stderr.join().unwrap_or_default();
    text.lines()
        .filter(|line| !line.contains("dbus"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The DOM headless Chromium built from `url`, or why there is none.
pub fn rendered_dom(url: &str, profile: &Path) -> Result<String, String> {
    if !Path::new(CHROMIUM).exists() {
        return Err(format!(
            "{CHROMIUM} is missing; scripts/install-packages installs it"
        ));
    }
    let mut command = Command::new(CHROMIUM);
    command
        .args(["--headless=new", "--disable-gpu", "--dump-dom"])
        .arg(format!("--user-data-dir={}", profile.display()));
    // Chromium refuses to start as root with its sandbox on (the sandbox needs an
    // unprivileged user); test containers often run as root. As any other user the
    // sandbox stays on.
    if running_as_root() {
        command.arg("--no-sandbox");
    }
    let mut child = command
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot start {CHROMIUM}: {error}"))?;
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let reading = std::thread::spawn(move || {
        let mut dom = String::new();
        let _ = stdout.read_to_string(&mut dom);
        dom
    });
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "chromium did not render {url} within {DEADLINE:?}; its stderr:\n{}",
                chromium_errors(errors)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let dom = reading.join().expect("read chromium's output");
    if status.success() && dom.contains("</html>") {
        Ok(dom)
    } else {
        Err(format!(
            "chromium rendered nothing from {url} ({status}, {} bytes); its stderr:\n{}",
            dom.len(),
            chromium_errors(errors)
        ))
    }
}
