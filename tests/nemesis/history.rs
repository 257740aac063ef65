//! The run's history: every operation, fault and observation as one JSON line with
//! its wall-clock time (`t`, Unix milliseconds). Written as it happens, so a run that
//! dies still leaves what it saw; the checker reads the file back, not the run's
//! memory, and can be run again on it.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Map, Value, json};

pub struct History {
    file: Mutex<File>,
    pub path: PathBuf,
}

pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis() as i64
}

impl History {
    pub fn create(path: &Path) -> History {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        History {
            file: Mutex::new(File::create(path).unwrap()),
            path: path.to_owned(),
        }
    }

    /// Appends `{"t": now, "event": event, ...fields}`.
    pub fn log(&self, event: &str, fields: Value) {
        let mut line = Map::new();
        line.insert("t".to_owned(), json!(unix_ms()));
        line.insert("event".to_owned(), json!(event));
        if let Value::Object(fields) = fields {
            line.extend(fields);
        }
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.write_all(text.as_bytes()).unwrap();
    }
}

/// Every line of a history file.
pub fn read(path: &Path) -> Vec<Value> {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    BufReader::new(file)
        .lines()
        .map(|line| serde_json::from_str(&line.unwrap()).unwrap())
        .collect()
}
