//! Codec ratio and speed on real KV chunks (issue 12, docs/BENCHMARKS.md "Codecs"); run by
//! `scripts/bench-codecs` in a release build.
//!
//! `codec_speed DIR [CODEC,...] [DTYPE,...]`: reads every raw `.kvc` chunk under DIR (made by the `codec_quality kv`
//! example: SmolLM2 KV of real English text, f32), and for the KV as it is (f32) and converted
//! to bf16 measures, on one thread, per codec: the ratio of raw to stored group bytes and of
//! raw to coded file bytes (headers and padding included), encode and decode speed in GB/s of
//! raw bytes, and `memcpy` of the same groups as the peer. Each speed is given twice, as the
//! median over passes of raw bytes per second of the measuring thread's CPU time
//! (`CLOCK_THREAD_CPUTIME_ID`: "GB/s per core", which the machine's load does not inflate) and
//! of wall time (which it does). Prints one `RESULT {json}` line per (dtype, codec).

use kvfs_loader::codec::stored::group_shape;
use kvfs_loader::codec::{Codec, Coder, from_f32, to_f32};
use kvfs_loader::format::{ChunkView, Verify, encode_chunk_coded};
use kvfs_loader::{ChunkMeta, Dtype};
use std::time::Instant;

fn files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "kvc") {
            out.push(p);
        }
    }
}

/// One chunk's planes in `dtype`, and its meta with that dtype.
struct Chunk {
    meta: ChunkMeta,
    planes: Vec<Vec<u8>>,
}

/// This thread's CPU time in seconds.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds of one pass of `f`, as (thread CPU time, wall time), medians over `passes`.
fn timed(passes: usize, mut f: impl FnMut()) -> (f64, f64) {
    let (mut cpu, mut wall) = (Vec::new(), Vec::new());
    for _ in 0..passes {
        let (c, t) = (thread_cpu_s(), Instant::now());
        f();
        wall.push(t.elapsed().as_secs_f64());
        cpu.push(thread_cpu_s() - c);
    }
    (median(cpu), median(wall))
}

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("DIR"));
    // Optional: a comma-separated list of codecs to measure (all by default), e.g. to profile one.
    let only: Option<Vec<Codec>> = std::env::args()
        .nth(2)
        .map(|s| s.split(',').map(|c| Codec::parse(c).unwrap()).collect());
    let mut paths = Vec::new();
    files(&dir, &mut paths);
    paths.sort();
    assert!(!paths.is_empty(), "no chunks under {}", dir.display());
    let raw_files: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    // Optional: the KV dtypes to measure, `f32,bf16` by default.
    let dtypes: Vec<Dtype> = match std::env::args().nth(3) {
        Some(s) => s.split(',').map(|d| Dtype::parse(d).unwrap()).collect(),
        None => vec![Dtype::F32, Dtype::Bf16],
    };
    for dtype in dtypes {
        let mut chunks = Vec::new();
        let mut values = Vec::new();
        for bytes in &raw_files {
            let v = ChunkView::parse(bytes, Verify::Full).unwrap();
            let g = v.header.geometry;
            let mut meta = v.header.meta.clone();
            let mut planes = Vec::new();
            for l in 0..g.num_layers {
                for p in 0..g.planes {
                    let src = v.plane(l, p).unwrap();
                    to_f32(meta.dtype, src, &mut values);
                    let mut out = vec![0u8; values.len() * dtype.size()];
                    from_f32(dtype, &values, &mut out);
                    planes.push(out);
                }
            }
            meta.dtype = dtype;
            chunks.push(Chunk { meta, planes });
        }
        let raw_bytes: usize = chunks.iter().flat_map(|c| &c.planes).map(Vec::len).sum();
        let tokens: usize = chunks.iter().map(|c| c.meta.tokens.len()).sum();
        // Every group of every plane, as (chunk, plane index, group).
        let g0 = chunks[0].meta.geometry().unwrap();
        let groups = g0.groups();
        let per_chunk = (g0.num_layers * g0.planes) as usize;
        let tb = g0.token_bytes as usize;
        let mut scratch = vec![0u8; g0.group_tokens as usize * tb];
        let memcpy_s = timed(7, || {
            for c in &chunks {
                for plane in &c.planes {
                    for g in 0..groups {
                        let t = g0.group_tokens_range(g);
                        let src = &plane[t.start as usize * tb..t.end as usize * tb];
                        scratch[..src.len()].copy_from_slice(src);
                        std::hint::black_box(&scratch);
                    }
                }
            }
        });
        for codec in Codec::ALL.into_iter().filter(|c| *c != Codec::Raw) {
            if only.as_ref().is_some_and(|o| !o.contains(&codec)) {
                continue;
            }
            let mut coder = Coder::new();
            let mut stored: Vec<Vec<u8>> = Vec::new();
            let encode_s = timed(3, || {
                stored.clear();
                for c in &chunks {
                    for (pi, plane) in c.planes.iter().enumerate() {
                        for g in 0..groups {
                            let shape = group_shape(&c.meta, &g0, pi as u32 % g0.planes, g);
                            let t = g0.group_tokens_range(g);
                            let mut out = Vec::new();
                            coder
                                .encode(
                                    codec,
                                    &shape,
                                    &plane[t.start as usize * tb..t.end as usize * tb],
                                    &mut out,
                                )
                                .unwrap();
                            stored.push(out);
                        }
                    }
                }
            });
            let stored_bytes: usize = stored.iter().map(Vec::len).sum();
            let decode_s = timed(7, || {
                let mut i = 0;
                for c in &chunks {
                    for pi in 0..per_chunk {
                        for g in 0..groups {
                            let shape = group_shape(&c.meta, &g0, pi as u32 % g0.planes, g);
                            let n = shape.raw_len();
                            coder
                                .decode(codec, &shape, &stored[i], &mut scratch[..n])
                                .unwrap();
                            std::hint::black_box(&scratch);
                            i += 1;
                        }
                    }
                }
            });
            // Whole files: header, group table and layer padding included.
            let mut raw_file = 0usize;
            let mut coded_file = 0usize;
            for c in &chunks {
                let fill = |l: u32, p: u32, dst: &mut [u8]| {
                    dst.copy_from_slice(&c.planes[(l * g0.planes + p) as usize])
                };
                raw_file += encode_chunk_coded(&c.meta, Codec::Raw, fill).unwrap().len();
                coded_file += encode_chunk_coded(&c.meta, codec, fill).unwrap().len();
            }
            let gbps = |s: f64| raw_bytes as f64 / s / 1e9;
            println!(
                "RESULT {}",
                serde_json_line(&[
                    ("dtype", format!("\"{dtype}\"")),
                    ("codec", format!("\"{codec}\"")),
                    ("chunks", chunks.len().to_string()),
                    ("tokens", tokens.to_string()),
                    ("raw_bytes", raw_bytes.to_string()),
                    ("stored_bytes", stored_bytes.to_string()),
                    (
                        "ratio",
                        format!("{:.4}", raw_bytes as f64 / stored_bytes as f64)
                    ),
                    ("raw_file_bytes", raw_file.to_string()),
                    ("coded_file_bytes", coded_file.to_string()),
                    (
                        "file_ratio",
                        format!("{:.4}", raw_file as f64 / coded_file as f64)
                    ),
                    (
                        "stored_bytes_per_token",
                        format!("{:.1}", coded_file as f64 / tokens as f64)
                    ),
                    ("encode_gbps_cpu", format!("{:.3}", gbps(encode_s.0))),
                    ("decode_gbps_cpu", format!("{:.3}", gbps(decode_s.0))),
                    ("memcpy_gbps_cpu", format!("{:.3}", gbps(memcpy_s.0))),
                    ("encode_gbps_wall", format!("{:.3}", gbps(encode_s.1))),
                    ("decode_gbps_wall", format!("{:.3}", gbps(decode_s.1))),
                    ("memcpy_gbps_wall", format!("{:.3}", gbps(memcpy_s.1))),
                ])
            );
        }
    }
}

/// A flat JSON object from already-encoded values (this example has no JSON dependency).
fn serde_json_line(fields: &[(&str, String)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("\"{k}\": {v}"))
        .collect();
    format!("{{{}}}", body.join(", "))
}
