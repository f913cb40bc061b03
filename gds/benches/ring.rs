//! Host-side benchmark of the staging ring's read stage (harness = false; runs anywhere).
//!
//! The staging path can only reach PCIe speed if reading fills from the page cache is faster
//! than the host-to-device copy. This runs the same Llama-3-8B shaped, layer-major load as
//! `benches/gpu.rs` through the ring with a sink that drops the bytes (on a GPU the copy to
//! the device is DMA, so this is the CPU's whole share), with 1, 2 and 4 reader threads,
//! against `dd` reading the same files from the page cache (peer in the same run) and a plain
//! `memcpy` of the same byte count.
//!
//! Environment: `KVFS_BENCH_TOKENS` (default 8192 = 1 GiB), `KVFS_BENCH_DIR` (default
//! `target/kvfs-ring-bench` in the workspace), `KVFS_BENCH_RUNS` (default 3).

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use kvfs_gds::plan::Fill;
use kvfs_gds::{AlignedBuf, PagedLayout, ReadExtent, Result, Ring, ScatterPlan, Segment, Sink};

/// The staging path's host work without the device: reads land in the ring buffers and are
/// dropped (on a GPU they would be copied by DMA, costing the CPU nothing).
struct DiscardSink;

impl Sink for DiscardSink {
    type Buffer = AlignedBuf;
    fn alloc_buffer(&mut self, len: usize) -> Result<AlignedBuf> {
        kvfs_gds::align::aligned_buf(len)
    }
    fn begin(&mut self, _: &ScatterPlan) -> Result<()> {
        Ok(())
    }
    fn submit(&mut self, _: usize, _: &AlignedBuf, _: &Fill, _: &ScatterPlan) -> Result<()> {
        Ok(())
    }
    fn wait_slot(&mut self, _: usize) -> Result<()> {
        Ok(())
    }
    fn layer_ready(&mut self, _: usize) -> Result<()> {
        Ok(())
    }
    fn gather(&mut self, _: &mut AlignedBuf, _: &Fill, _: &ScatterPlan) -> Result<()> {
        Ok(())
    }
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

const LAYERS: u64 = 32;
const ROW: u64 = 8 * 128 * 2;
const CHUNK: u64 = 256;
const BLOCK: u64 = 16;
const HEADER: u64 = 4096;

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn main() {
    let tokens = env_u64("KVFS_BENCH_TOKENS", 8192) / CHUNK * CHUNK;
    let runs = env_u64("KVFS_BENCH_RUNS", 3).max(1);
    let dir = std::env::var_os("KVFS_BENCH_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kvfs-ring-bench"),
        PathBuf::from,
    );
    let chunks = tokens / CHUNK;
    let kv = CHUNK * ROW;
    let file_len = HEADER + LAYERS * 2 * kv;
    let total = chunks * LAYERS * 2 * kv;
    let paths = make_files(&dir, chunks, file_len);
    for p in &paths {
        let _ = std::fs::read(p);
    }
    let files: Vec<File> = paths.iter().map(|p| File::open(p).unwrap()).collect();
    let blocks = tokens / BLOCK;
    let layer_bytes = 2 * blocks * BLOCK * ROW;
    let mut table: Vec<u32> = (0..blocks as u32).collect();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in (1..table.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        table.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let mut extents = Vec::new();
    let mut segments = Vec::new();
    let mut src = 0;
    for l in 0..LAYERS {
        for (c, f) in files.iter().enumerate() {
            for k in 0..2 {
                extents.push(ReadExtent {
                    file: f.as_raw_fd(),
                    offset: HEADER + (l * 2 + k) * kv,
                    len: kv,
                });
                segments.push(Segment {
                    layer: l as u32,
                    src_offset: src,
                    dst_base: l * layer_bytes + k * blocks * BLOCK * ROW,
                    first_token: c as u64 * CHUNK,
                    n_tokens: CHUNK,
                });
                src += kv;
            }
        }
    }
    let layout = PagedLayout {
        block_size: BLOCK,
        block_stride: BLOCK * ROW,
        slot_stride: ROW,
        row_bytes: ROW,
    };
    let plan = ScatterPlan::from_block_table(&layout, &table, &segments).unwrap();
    let gbs = |s: f64| total as f64 / s / 1e9;
    println!(
        "workload: {tokens} tokens, {chunks} files, {:.2} GiB, layer-major, {} runs",
        total as f64 / (1u64 << 30) as f64,
        plan.runs().len()
    );

    let mut arena = vec![0u8; (LAYERS * layer_bytes) as usize];
    let src_buf = vec![1u8; total as usize];
    let mut memcpy = f64::MAX;
    for _ in 0..runs {
        let t = Instant::now();
        arena.copy_from_slice(&src_buf);
        memcpy = memcpy.min(t.elapsed().as_secs_f64());
    }
    drop(src_buf);
    let dd = dd_gbs(&paths, runs);
    println!("memcpy of the same bytes:       {:6.2} GB/s", gbs(memcpy));
    if let Some(d) = dd {
        println!("dd from page cache (peer):      {d:6.2} GB/s");
    }
    for readers in [1, 2, 4] {
        let mut ring = Ring::new(DiscardSink, 3, 16 << 20).unwrap();
        ring.set_readers(readers);
        let mut best = f64::MAX;
        for _ in 0..runs {
            let t = Instant::now();
            ring.load_extents(&extents, &plan).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        let vs_dd = dd.map_or(String::new(), |d| format!(", {:.2}x dd", gbs(best) / d));
        println!(
            "ring read stage, {readers} reader(s):  {:6.2} GB/s ({:.2}x memcpy{vs_dd})",
            gbs(best),
            memcpy / best
        );
    }
}

fn make_files(dir: &Path, n: u64, len: u64) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    (0..n)
        .map(|i| {
            let p = dir.join(format!("chunk{i:04}.kvc"));
            if std::fs::metadata(&p).map(|m| m.len()).ok() != Some(len) {
                let mut f = File::create(&p).unwrap();
                let buf: Vec<u8> = (0..len)
                    .map(|j| (j as u8).wrapping_mul(31) ^ i as u8)
                    .collect();
                f.write_all(&buf).unwrap();
            }
            p
        })
        .collect()
}

/// `dd` reading every file to /dev/null, best of `runs`, GB/s.
fn dd_gbs(paths: &[PathBuf], runs: u64) -> Option<f64> {
    let bytes: u64 = paths
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    let mut best = f64::MAX;
    for _ in 0..runs {
        let t = Instant::now();
        for p in paths {
            let ok = Command::new("dd")
                .arg(format!("if={}", p.display()))
                .args(["of=/dev/null", "bs=1M", "status=none"])
                .status()
                .ok()?
                .success();
            if !ok {
                return None;
            }
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    Some(bytes as f64 / best / 1e9)
}
