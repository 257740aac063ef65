//! Backup throughput: whole `stillpoint backup`s of the large database (pg_dump →
//! zstd 3 → age → BLAKE3 → local file storage), against the shell pipeline an operator
//! would write, on the same database in the same run:
//!
//! ```sh
//! pg_dump -Fc -Z0 --snapshot=… | zstd -3 | age -r … > file
//! ```
//!
//! and the pipeline alone on an in-memory stream (the first part of the same dump)
//! against each of its stages run by itself, with the same crates and settings. zstd
//! compresses on a thread of its own while the pipeline's worker thread reads,
//! encrypts and hashes, so the pipeline's bound is its slowest stage (zstd), not the
//! sum of the stage times (1 / (1/zstd + 1/age + 1/BLAKE3) in throughput), which
//! would be the bound of one thread doing everything; both are shown.

use std::io::{Cursor, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use stillpoint::manifest::Manifest;
use stillpoint::pipeline::{self, Encryption, PipelineSettings};
use stillpoint::storage::Storage;
use tokio_postgres::NoTls;

use crate::Fixture;
use crate::support::{self, Row, Target, median};

const SECTION: &str = "5. pipeline";
/// Bytes per write into each stage: what the pipeline reads from a copy at a time.
const CHUNK: usize = 64 * 1024;
/// Runs of the in-memory pipeline and of each stage.
const STAGE_RUNS: usize = 3;
/// zstd's job size as src/pipeline/mod.rs sets it.
const ZSTD_JOB_SIZE: u32 = 4 * 1024 * 1024;

#[derive(Default)]
pub struct Backups {
    /// Whole backups of the large database.
    pub stillpoint: Vec<Manifest>,
    pub shell: Vec<ShellRun>,
}

pub struct ShellRun {
    pub elapsed: Duration,
    /// Bytes the pipeline wrote.
    pub stored: u64,
    /// fsync of the output afterwards: not part of the pipeline as written, but
    /// stillpoint's local storage fsyncs every artifact before it counts as stored.
    pub fsync: Duration,
}

/// The shell pipeline on the large database, inside an exported snapshot as
/// stillpoint's own copy is.
pub async fn shell_pipeline(fixture: &Fixture) -> ShellRun {
    let url = fixture.postgres.url(fixture.large.name);
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    let driver = tokio::spawn(connection);
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .unwrap();
    let snapshot: String = client
        .query_one("SELECT pg_export_snapshot()", &[])
        .await
        .unwrap()
        .get(0);
    let out = fixture.dir.path().join("shell.pgdump.zst.age");
    let script = format!(
        "set -o pipefail; '{pg_dump}' --snapshot={snapshot} -Fc -Z0 --no-password \
         --dbname='{url}' | zstd -3 -q | age -r {recipient} > '{out}'",
        pg_dump = fixture.tool("pg_dump").display(),
        recipient = fixture.recipient,
        out = out.display(),
    );
    let started = Instant::now();
    let status = tokio::process::Command::new("bash")
        .args(["-c", &script])
        .status()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert!(status.success(), "the shell pipeline failed: {script}");
    let fsync_started = Instant::now();
    std::fs::File::open(&out).unwrap().sync_all().unwrap();
    let fsync = fsync_started.elapsed();
    client.batch_execute("COMMIT").await.unwrap();
    drop(client);
    driver.await.unwrap().unwrap();
    let stored = std::fs::metadata(&out).unwrap().len();
    std::fs::remove_file(&out).unwrap();
    ShellRun {
        elapsed,
        stored,
        fsync,
    }
}

/// The pipeline and each of its stages on the same bytes in memory.
pub struct Stages {
    pub raw: u64,
    pub compressed: u64,
    pub encrypted: u64,
    pub zstd: Duration,
    pub age: Duration,
    pub blake3: Duration,
    pub pipeline: Duration,
}

pub async fn in_memory(fixture: &Fixture, quick: bool) -> Stages {
    let limit = if quick { 32 << 20 } else { 512 << 20 };
    let raw = dump_prefix(fixture, limit);
    // tmpfs when there is one, so storage costs a memory copy and nothing else.
    let dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let storage = Storage::open(&format!("file://{}", dir.path().display())).unwrap();
    let settings = PipelineSettings {
        zstd_level: Some(3),
        encryption: Encryption::Recipients(vec![fixture.recipient.clone()]),
    };
    let recipient: age::x25519::Recipient = fixture.recipient.parse().unwrap();
    let mut runs: [Vec<f64>; 4] = Default::default();
    let (mut compressed_len, mut encrypted_len) = (0, 0);
    for _ in 0..STAGE_RUNS {
        let started = Instant::now();
        let stream = Box::pin(Cursor::new(raw.clone()));
        pipeline::store(stream, &settings, &storage, "memory.zst.age", |_| {})
            .await
            .unwrap();
        runs[0].push(started.elapsed().as_secs_f64());
        storage.delete("memory.zst.age").await.unwrap();

        let started = Instant::now();
        let compressed = zstd_stage(&raw);
        runs[1].push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        let encrypted = age_stage(&compressed, &recipient);
        runs[2].push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        std::hint::black_box(blake3_stage(&encrypted));
        runs[3].push(started.elapsed().as_secs_f64());
        (compressed_len, encrypted_len) = (compressed.len() as u64, encrypted.len() as u64);
    }
    let seconds = |values: &[f64]| Duration::from_secs_f64(median(values));
    Stages {
        raw: raw.len() as u64,
        compressed: compressed_len,
        encrypted: encrypted_len,
        pipeline: seconds(&runs[0]),
        zstd: seconds(&runs[1]),
        age: seconds(&runs[2]),
        blake3: seconds(&runs[3]),
    }
}

/// The first `limit` bytes of the large database's raw copy, as the backup's pg_dump
/// writes it.
fn dump_prefix(fixture: &Fixture, limit: u64) -> Bytes {
    let mut child = Command::new(fixture.tool("pg_dump"))
        .args(["-Fc", "-Z0", "--no-password"])
        .arg(format!(
            "--dbname={}",
            fixture.postgres.url(fixture.large.name)
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut raw = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .take(limit)
        .read_to_end(&mut raw)
        .unwrap();
    // Stopping pg_dump early is the point when it has more to give.
    let _ = child.kill();
    let _ = child.wait();
    Bytes::from(raw)
}

/// The zstd stage as the pipeline configures it: level 3, a frame checksum, one
/// worker thread compressing 4 MiB jobs (this thread only hands it the input).
fn zstd_stage(raw: &[u8]) -> Vec<u8> {
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    encoder.include_checksum(true).unwrap();
    encoder.multithread(1).unwrap();
    encoder
        .set_parameter(zstd::zstd_safe::CParameter::JobSize(ZSTD_JOB_SIZE))
        .unwrap();
    for chunk in raw.chunks(CHUNK) {
        encoder.write_all(chunk).unwrap();
    }
    encoder.finish().unwrap()
}

/// The age stage: one X25519 recipient, STREAM chunks of 64 KiB.
fn age_stage(plain: &[u8], recipient: &age::x25519::Recipient) -> Vec<u8> {
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(recipient as &dyn age::Recipient)).unwrap();
    let mut writer = encryptor.wrap_output(Vec::new()).unwrap();
    for chunk in plain.chunks(CHUNK) {
        writer.write_all(chunk).unwrap();
    }
    writer.finish().unwrap()
}

fn blake3_stage(stored: &[u8]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    for chunk in stored.chunks(CHUNK) {
        hasher.update(chunk);
    }
    hasher.finalize()
}

impl Backups {
    pub fn report(&self, fixture: &Fixture, stages: &Stages) -> (String, Vec<Row>) {
        let raw = self.stillpoint[0].databases[0]
            .artifact
            .as_ref()
            .unwrap()
            .size;
        let stored = self.stillpoint[0].databases[0]
            .artifact
            .as_ref()
            .unwrap()
            .stored_size;
        let seconds = |values: Vec<f64>| median(&values);
        let total = seconds(
            self.stillpoint
                .iter()
                .map(|m| m.timings.total_ms as f64 / 1000.0)
                .collect(),
        );
        let copy = seconds(
            self.stillpoint
                .iter()
                .map(|m| m.timings.copy_ms as f64 / 1000.0)
                .collect(),
        );
        let shell = seconds(self.shell.iter().map(|r| r.elapsed.as_secs_f64()).collect());
        let fsync = seconds(self.shell.iter().map(|r| r.fsync.as_secs_f64()).collect());
        let shell_stored = self.shell[0].stored;
        let rate = |bytes: u64, seconds: f64| bytes as f64 / 1e6 / seconds;
        let backup_ratio = shell / total;

        let serial = stages.zstd + stages.age + stages.blake3;
        let slowest = stages.zstd.max(stages.age).max(stages.blake3);
        let stage_ratio = slowest.as_secs_f64() / stages.pipeline.as_secs_f64();
        let stage_row = |name: &str, time: Duration, input: u64, output: u64| {
            format!(
                "| {name} | {input_mib:.0} → {output_mib:.0} MiB | {:.2} s | {:.0} MB/s |\n",
                time.as_secs_f64(),
                rate(stages.raw, time.as_secs_f64()),
                input_mib = support::mib(input),
                output_mib = support::mib(output),
            )
        };
        let body = format!(
            "{measured} {runs} runs of each, alternating with the window benchmark's \
             backups; medians. Raw copy: {raw_mib:.0} MiB (`pg_dump -Fc -Z0` of the \
             {db_mib:.0} MiB database); stored: {stored_mib:.0} MiB.\n\n\
             | | time | throughput (raw) |\n|---|---|---|\n\
             | `stillpoint backup` (whole: prepare, pause, cut, copy, row counts, manifest) \
             | {total:.2} s | {sp_rate:.0} MB/s |\n\
             | its copy phase alone | {copy:.2} s | {copy_rate:.0} MB/s |\n\
             | `pg_dump -Fc -Z0 --snapshot=… \\| zstd -3 \\| age -r … > file` | {shell:.2} s \
             | {shell_rate:.0} MB/s |\n\
             | fsync of the shell's output afterwards (not in the row above) | {fsync:.2} s | |\n\n\
             **Backup throughput stillpoint / shell: {backup_ratio:.2}×** (target ≥ 0.9×). \
             The shell's output was {shell_stored_mib:.0} MiB.\n\n\
             The pipeline alone, {stage_mib:.0} MiB of the same raw copy in memory into \
             storage on tmpfs, against each stage by itself (same crates and settings, \
             {chunk} KiB writes; zstd on its one worker thread, as in the pipeline); \
             {stage_runs} runs, medians. Throughput is raw bytes per second whatever the \
             stage's own input.\n\n\
             | stage | bytes in → out | time | throughput (raw) |\n|---|---|---|---|\n\
             {zstd_row}{age_row}{blake3_row}\
             | sum of the stage times (the bound of one thread doing all) | | {serial:.2} s \
             | {serial_rate:.0} MB/s |\n\
             | slowest stage (the pipeline's bound: zstd has its own thread) | | \
             {slowest:.2} s | {slowest_rate:.0} MB/s |\n\
             | stillpoint pipeline (`pipeline::store`) | | {pipeline:.2} s \
             | {pipeline_rate:.0} MB/s |\n\n\
             **Pipeline / slowest stage: {stage_ratio:.2}×** in throughput. zstd \
             compresses on its own thread while the pipeline's worker reads, encrypts \
             and hashes, so the slowest stage bounds it; the sum of the stage times is \
             what one thread doing everything would reach.",
            measured = support::measured_line("scripts/bench postgres"),
            runs = self.stillpoint.len(),
            raw_mib = support::mib(raw),
            db_mib = support::mib(fixture.large.bytes),
            stored_mib = support::mib(stored),
            sp_rate = rate(raw, total),
            copy_rate = rate(raw, copy),
            shell_rate = rate(raw, shell),
            shell_stored_mib = support::mib(shell_stored),
            stage_mib = support::mib(stages.raw),
            chunk = CHUNK / 1024,
            stage_runs = STAGE_RUNS,
            zstd_row = stage_row("zstd -3", stages.zstd, stages.raw, stages.compressed),
            age_row = stage_row(
                "age (X25519)",
                stages.age,
                stages.compressed,
                stages.encrypted
            ),
            blake3_row = stage_row("BLAKE3", stages.blake3, stages.encrypted, stages.encrypted),
            serial = serial.as_secs_f64(),
            serial_rate = rate(stages.raw, serial.as_secs_f64()),
            slowest = slowest.as_secs_f64(),
            slowest_rate = rate(stages.raw, slowest.as_secs_f64()),
            pipeline = stages.pipeline.as_secs_f64(),
            pipeline_rate = rate(stages.raw, stages.pipeline.as_secs_f64()),
        );
        let rows = vec![
            Row::new(
                SECTION,
                &format!(
                    "backup throughput, {:.0} MiB database, vs `pg_dump \\| zstd -3 \\| age`",
                    support::mib(fixture.large.bytes)
                ),
                format!("{:.0} MB/s ({total:.1} s)", rate(raw, total)),
                format!("{:.0} MB/s ({shell:.1} s)", rate(raw, shell)),
                Some(backup_ratio),
                Target::AtLeast(0.9),
            ),
            Row::new(
                SECTION,
                "pipeline on an in-memory stream vs its slowest stage (zstd) alone",
                format!(
                    "{:.0} MB/s",
                    rate(stages.raw, stages.pipeline.as_secs_f64())
                ),
                format!(
                    "{:.0} MB/s (all stages on one thread: {:.0} MB/s)",
                    rate(stages.raw, slowest.as_secs_f64()),
                    rate(stages.raw, serial.as_secs_f64())
                ),
                Some(stage_ratio),
                Target::None,
            ),
        ];
        (body, rows)
    }
}
