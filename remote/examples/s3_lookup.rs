//! Benchmark: remote prefix lookup of a 512-chunk prompt, against sequential HEADs per chunk
//! measured in the same run on the same bucket. Used by `scripts/bench-s3`.
//!
//! Loopback round trips cost a fraction of a millisecond, so the run is repeated through a
//! small TCP proxy in this process that delays every forwarded read by half of
//! `KVFS_BENCH_RTT_MS` (default 10 ms, a typical S3 first-byte latency) in each direction.
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

/// A TCP relay to `upstream` that delays each forwarded read by `half_rtt`; returns its URL.
fn delaying_proxy(rt: &tokio::runtime::Runtime, upstream: &str, half_rtt: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = upstream.trim_start_matches("http://").to_string();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    async fn pipe(
        mut r: tokio::net::tcp::OwnedReadHalf,
        mut w: tokio::net::tcp::OwnedWriteHalf,
        delay: Duration,
    ) {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                break;
            }
            tokio::time::sleep(delay).await;
            if w.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    }
    rt.spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, half_rtt));
                tokio::spawn(pipe(sr, cw, half_rtt));
            });
        }
    });
    format!("http://{addr}")
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
    let rtt_ms: u64 = std::env::var("KVFS_BENCH_RTT_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let url = format!("s3://{bucket}/{prefix}");
    let remote = Remote::open(
        S3Config::from_url(&url).unwrap().with_endpoint(&endpoint),
        None,
    )
    .unwrap();
    let proxy_rt = tokio::runtime::Runtime::new().unwrap();
    let slow_endpoint = delaying_proxy(&proxy_rt, &endpoint, Duration::from_millis(rtt_ms) / 2);
    let slow = Remote::open(
        S3Config::from_url(&url)
            .unwrap()
            .with_endpoint(slow_endpoint),
        None,
    )
    .unwrap();
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
    for (label, remote, runs) in [("loopback", &remote, 5), ("+RTT", &slow, 3)] {
        let label = if label == "+RTT" {
            format!("loopback + {rtt_ms} ms RTT")
        } else {
            label.to_string()
        };
        println!("prefix lookup of {n} chunks ({label}; tiny chunks, {ns}; median of {runs})");
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
            for _ in 0..runs {
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
        println!();
    }
}
