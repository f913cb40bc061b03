//! What the mount's metrics cost (issue 16): sequential reads through two real FUSE mounts of
//! the same in-memory chunks, one whose backend counts every request in [`FsMetrics`] (as the
//! daemon's does) and one whose backend does nothing with them, read in alternation in the
//! same run; and `FsMetrics::observe` alone, per call.
//!
//! Reads reach the daemon (passthrough off, the page cache dropped before each pass), so
//! every read request pays the metrics: the worst case. With passthrough, reads of local chunks
//! never reach the daemon and the metrics cost nothing per byte.
//!
//! Needs root and /dev/fuse. Run with `scripts/bench-metrics` (or
//! `cargo bench -p kvfs-fs --bench metrics_cost`). Env: `MIB` (total chunk bytes, 512),
//! `RUNS` (5).

use kvfs_fs::testing::MemBackend;
use kvfs_fs::{ChunkBackend, FsMetrics, FsOp, MountOptions, OpReport};
use kvfs_loader::{ModelSpec, SaltTag, synth_chunk};
use std::fs::File;
use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Reads every file once with 1 MiB reads after dropping its cached pages; bytes and time.
fn read_all(files: &[PathBuf]) -> (u64, Duration) {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    let t = Instant::now();
    for p in files {
        let mut f = File::open(p).unwrap();
        // SAFETY: a valid descriptor; the advice only drops clean cached pages.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    (total, t.elapsed())
}

fn main() {
    // SAFETY: geteuid touches no memory.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/fuse").exists() {
        eprintln!("metrics_cost: needs root and /dev/fuse; skipped");
        return;
    }
    let mib = env("MIB", 512);
    let runs = env("RUNS", 5);
    let spec = ModelSpec::preset("llama-3-8b").unwrap();
    let ns = spec.namespace_dir();
    let tmp = tempfile::tempdir().unwrap();
    let metrics = FsMetrics::default();
    let backends: Vec<Arc<MemBackend>> = [false, true]
        .iter()
        .map(|&on| {
            let incoming = tmp.path().join(format!("incoming-{on}"));
            std::fs::create_dir_all(&incoming).unwrap();
            let b = MemBackend::new(&incoming, u64::MAX);
            Arc::new(if on {
                b.with_metrics(metrics.clone())
            } else {
                b
            })
        })
        .collect();
    let mut names = Vec::new();
    let mut bytes = 0usize;
    let mut first = 0u32;
    while bytes < mib << 20 {
        let tokens: Vec<u32> = (first..first + spec.chunk_tokens).collect();
        first += spec.chunk_tokens;
        let (meta, chunk) = synth_chunk(&spec, None, SaltTag::NONE, tokens).unwrap();
        bytes += chunk.len();
        for b in &backends {
            b.insert(&ns, meta.key, chunk.clone());
        }
        names.push(meta.key.file_name());
    }
    let opts = MountOptions {
        passthrough: false,
        ..MountOptions::default()
    };
    let mut sessions = Vec::new();
    let mut files: Vec<Vec<PathBuf>> = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        let dir = tmp.path().join(format!("mnt{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let backend: Arc<dyn ChunkBackend> = b.clone();
        sessions.push(kvfs_fs::spawn(backend, &dir, &opts).unwrap());
        files.push(names.iter().map(|n| dir.join(&ns).join(n)).collect());
    }
    // One pass each to settle, then alternate.
    read_all(&files[0]);
    read_all(&files[1]);
    let mut best = [Duration::MAX; 2];
    let mut total = 0;
    for run in 0..runs {
        // Alternate which mount goes first, so that neither always follows the other.
        for k in 0..2 {
            let i = (run + k) % 2;
            let (n, t) = read_all(&files[i]);
            total = n;
            best[i] = best[i].min(t);
        }
    }
    let gib_s = |t: Duration| total as f64 / t.as_secs_f64() / (1u64 << 30) as f64;
    let reads = {
        // The requests a pass makes: measured by the metered mount itself.
        let mut reg = prometheus_client::registry::Registry::default();
        metrics.register(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        text.lines()
            .find(|l| l.starts_with("fuse_operations_total{") && l.contains("operation=\"read\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / (runs + 1) as f64
    };
    // observe() alone, per call.
    let m = FsMetrics::default();
    let report = OpReport {
        op: FsOp::Read,
        elapsed: Duration::from_micros(40),
        ok: true,
        bytes: 1 << 17,
    };
    let n = 2_000_000u32;
    let t = Instant::now();
    for _ in 0..n {
        m.observe(std::hint::black_box(&report));
    }
    let per_call = t.elapsed() / n;
    let off = gib_s(best[0]);
    let on = gib_s(best[1]);
    let per_request = best[1].as_secs_f64() / reads.max(1.0);
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| sequential read, no passthrough, best of {runs}, {:.0} MiB | metrics off {off:.2} GiB/s, on {on:.2} GiB/s: on/off {:.3} |",
        total as f64 / (1 << 20) as f64,
        on / off
    );
    println!(
        "| read requests per pass | {reads:.0} ({:.0} KiB each, {:.1} us each) |",
        total as f64 / reads.max(1.0) / 1024.0,
        per_request * 1e6
    );
    println!(
        "| FsMetrics::observe per call | {:.0} ns = {:.2}% of a read request |",
        per_call.as_nanos(),
        per_call.as_secs_f64() / per_request * 100.0
    );
    drop(sessions);
}
