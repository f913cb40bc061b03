//! Benchmark: remote prefix lookup of a 512-chunk prompt, against sequential HEADs per chunk
//! measured in the same run on the same bucket. Used by `scripts/bench-s3`.
//!
//! Needs an S3 server from the environment (`eval "$(scripts/garage env)"`):
//! `KVFS_TEST_S3_ENDPOINT`, `KVFS_TEST_S3_BUCKET`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`.

use kvfs_loader::{ChunkKey, ModelSpec, SaltTag, synth_chunk};
use kvfs_remote::{Remote, S3Config};
use std::time::{Duration, Instant};

fn chain(spec: &ModelSpec, n: usize, seed: u32) -> Vec<(ChunkKey, Vec<u8>)> {
    let mut parent = None;
    (0..n)
        .map(|i| {
            let tokens: Vec<u32> = (0..16)
                .map(|t| seed * 1_000_003 + i as u32 * 16 + t)
                .collect();
            let (meta, bytes) = synth_chunk(spec, parent, SaltTag::NONE, tokens).unwrap();
            parent = Some(meta.key);
            (meta.key, bytes)
        })
        .collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let endpoint = std::env::var("KVFS_TEST_S3_ENDPOINT")
        .expect("set KVFS_TEST_S3_ENDPOINT (eval \"$(scripts/garage env)\")");
    let bucket = std::env::var("KVFS_TEST_S3_BUCKET").expect("KVFS_TEST_S3_BUCKET");
    let n: usize = std::env::var("KVFS_BENCH_CHUNKS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(512);
    let prefix = format!("bench-lookup-{}", std::process::id());
    let cfg = S3Config::from_url(&format!("s3://{bucket}/{prefix}"))
        .unwrap()
        .with_endpoint(endpoint);
    let remote = Remote::open(cfg, None).unwrap();
    let spec = ModelSpec::preset("tiny").unwrap();
    let ns = spec.namespace_dir();
    let full = chain(&spec, n, 1);
    let part = chain(&spec, n, 2);
    let none = chain(&spec, n, 3);
    let partial_len = n * 3 / 5;
    std::thread::scope(|s| {
        for t in 0..8 {
            let (remote, ns, full, part) = (&remote, &ns, &full, &part);
            s.spawn(move || {
                for (i, (k, b)) in full.iter().enumerate().filter(|(i, _)| i % 8 == t) {
                    remote.upload(ns, k, b.clone()).unwrap();
                    if i < partial_len {
                        remote.upload(ns, &part[i].0, part[i].1.clone()).unwrap();
                    }
                }
            });
        }
    });
    println!("prefix lookup of {n} chunks (tiny chunks, {ns})");
    println!(
        "{:<22} {:>8} {:>9} {:>9} {:>12} {:>14} {:>8}",
        "case", "present", "requests", "rtrips", "kvfs ms", "sequential ms", "speedup"
    );
    for (name, keys, want) in [
        ("all present", &full, n),
        ("first 60% present", &part, partial_len),
        ("none present", &none, 0),
    ] {
        let keys: Vec<ChunkKey> = keys.iter().map(|(k, _)| *k).collect();
        let mut ours = Vec::new();
        let mut seq = Vec::new();
        let mut last = None;
        for _ in 0..5 {
            let t = Instant::now();
            let r = remote.prefix_lookup(&ns, &keys).unwrap();
            ours.push(t.elapsed());
            assert_eq!(r.present, want, "{name}");
            last = Some(r);
            // The peer: one HEAD per chunk, in order, until the first miss.
            let t = Instant::now();
            let mut present = 0;
            for k in &keys {
                if remote.object_size(&ns, k).unwrap().is_none() {
                    break;
                }
                present += 1;
            }
            seq.push(t.elapsed());
            assert_eq!(present, want);
        }
        let r = last.unwrap();
        let (o, s) = (median(ours), median(seq));
        println!(
            "{:<22} {:>8} {:>9} {:>9} {:>12.1} {:>14.1} {:>7.1}x",
            name,
            r.present,
            r.requests,
            r.round_trips,
            o.as_secs_f64() * 1e3,
            s.as_secs_f64() * 1e3,
            s.as_secs_f64() / o.as_secs_f64()
        );
    }
}
