//! Prometheus metrics end to end: the real `kvfs mount --metrics-addr` binary on a kernel
//! FUSE mount with an S3 tier (the in-process server behind the fault-injecting proxy),
//! scraped over HTTP by a real client (hyper, and `kvfs status`) while reads, a miss, a
//! corrupt chunk and S3 faults happen; the namespace label's bound with 1,000 namespaces;
//! and the errors a bad address gets.
//!
//! The mount needs /dev/fuse and root (see `support/require.rs`: a skip line, or a failure
//! under `KVFS_REQUIRE=fuse`).

mod support {
    pub mod mount;
    pub mod require;
    pub mod s3_server;
}

use kvfs::metrics::scrape::{self, Sample, sum};
use kvfs::remote_tier::S3Tier;
use kvfs::{Store, StoreConfig};
use kvfs_loader::{ChunkKey, ModelSpec, SaltTag, synth_chunk};
use kvfs_remote::Remote;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use support::mount::Mount;
use support::s3_server::{Fault, FaultProxy, S3Target};

const KVFS: &str = env!("CARGO_BIN_EXE_kvfs");

/// A loopback port nothing listens on (bound once, then closed).
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn scrape_now(addr: SocketAddr) -> Vec<Sample> {
    let text = scrape::fetch(addr, Duration::from_secs(10)).expect("scrape");
    scrape::parse(&text).expect("text format")
}

fn config_file(path: &Path, cache: &Path, t: &S3Target, endpoint: &str) {
    std::fs::write(
        path,
        format!(
            "cache_dir = {cache:?}\nfsync = \"never\"\n\n[s3]\nurl = \"s3://{}/{}\"\nendpoint = \"{endpoint}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nmax_retries = 1\nnegative_ttl_ms = 60000\n",
            t.bucket, t.prefix, t.region, t.access_key, t.secret_key
        ),
    )
    .unwrap();
}

fn chunk(spec: &ModelSpec, first: u32) -> (ChunkKey, Vec<u8>) {
    let (meta, bytes) = synth_chunk(
        spec,
        None,
        SaltTag::NONE,
        (first..first + spec.chunk_tokens).collect(),
    )
    .unwrap();
    (meta.key, bytes)
}

#[test]
fn a_mount_serves_metrics_that_move_with_reads_misses_faults_and_corruption() {
    if !support::require::fuse() {
        return;
    }
    let t = S3Target::new();
    let proxy = FaultProxy::start(&t.endpoint);
    let d = tempfile::tempdir().unwrap();
    let mut spec = ModelSpec::preset("tiny").unwrap();
    spec.chunk_tokens = 16;
    spec.group_tokens = 16;
    let ns = spec.namespace_dir();
    let (remote_key, remote_bytes) = chunk(&spec, 0);
    let (disk_key, disk_bytes) = chunk(&spec, 100);
    let (bad_key, bad_bytes) = chunk(&spec, 200);

    // Another host put `remote_key` in the bucket; this host holds `disk_key` and `bad_key`.
    {
        let seed = d.path().join("seed");
        kvfs::store::prepare_root(&seed, Default::default()).unwrap();
        let remote = Arc::new(Remote::open(t.config(), Some(&seed)).unwrap());
        let mut sc = StoreConfig::new(&seed);
        sc.remote = Some(Arc::new(S3Tier::new(
            remote.clone(),
            Duration::from_secs(30),
        )));
        let s = Store::open(sc).unwrap();
        s.create_namespace(&ns, Some(&spec)).unwrap();
        s.put(&ns, &remote_bytes).unwrap();
        assert!(remote.wait_uploaded(Duration::from_secs(30)));
    }
    let cache = d.path().join("cache");
    {
        let s = Store::open(StoreConfig::new(&cache)).unwrap();
        s.create_namespace(&ns, Some(&spec)).unwrap();
        s.put(&ns, &disk_bytes).unwrap();
        let bad = s.put(&ns, &bad_bytes).unwrap().path;
        // Flip a payload byte on disk: the mount's open-time check must catch it.
        let mut b = std::fs::read(&bad).unwrap();
        let last = b.len() - 1;
        b[last] ^= 0xff;
        std::fs::write(&bad, b).unwrap();
    }
    let cfg = d.path().join("kvfs.toml");
    config_file(&cfg, &cache, &t, &proxy.endpoint);
    let mnt = d.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let addr = free_addr();
    let mut cmd = Command::new(KVFS);
    cmd.env_remove("KVFS_CACHE_DIR")
        .env_remove("KVFS_S3")
        .arg("--config")
        .arg(&cfg)
        .arg("mount")
        .arg(&mnt)
        // Reads then reach the daemon (and its counters) instead of passing through.
        .arg("--no-passthrough")
        .args(["--metrics-addr", &addr.to_string()]);
    let _mount = Mount::spawn(cmd, &mnt);

    let before = scrape_now(addr);
    let fuse_reads = |s: &[Sample]| {
        sum(
            s,
            "kvfs_fuse_operations_total",
            &[("operation", "read"), ("outcome", "ok")],
        )
    };
    let file = |k: &ChunkKey| mnt.join(&ns).join(k.file_name());

    // A read of a chunk on local disk.
    assert_eq!(std::fs::read(file(&disk_key)).unwrap(), disk_bytes);
    // A read of a chunk only the bucket holds: fetched, verified, committed.
    assert_eq!(std::fs::read(file(&remote_key)).unwrap(), remote_bytes);
    // A miss: no tier holds this key.
    let (missing, _) = chunk(&spec, 300);
    assert!(std::fs::metadata(file(&missing)).is_err());
    // A corrupt chunk: refused (EIO) and quarantined.
    let e = std::fs::read(file(&bad_key)).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let after = scrape_now(addr);

    let delta =
        |name: &str, with: &[(&str, &str)]| sum(&after, name, with) - sum(&before, name, with);
    let nsl = ("namespace", ns.as_str());
    assert!(delta("kvfs_hits_total", &[nsl, ("tier", "disk")]) >= 1.0);
    assert_eq!(delta("kvfs_hits_total", &[nsl, ("tier", "remote")]), 1.0);
    assert_eq!(delta("kvfs_misses_total", &[nsl]), 1.0);
    assert!(delta("kvfs_lookups_total", &[nsl]) >= 3.0);
    // Reads of local chunks come from their files, not through the store: counted as FUSE
    // bytes; what the store itself served from the bucket is counted by tier.
    assert!(
        delta("kvfs_fuse_bytes_total", &[("operation", "read")])
            >= (disk_bytes.len() + remote_bytes.len()) as f64
    );
    assert_eq!(
        delta("kvfs_read_bytes_total", &[("tier", "remote")]),
        remote_bytes.len() as f64
    );
    // The fetched chunk was committed to disk.
    assert_eq!(delta("kvfs_chunks_committed_total", &[nsl]), 1.0);
    assert_eq!(delta("kvfs_verify_failures_total", &[]), 1.0);
    assert_eq!(delta("kvfs_quarantined_total", &[]), 1.0);
    assert_eq!(
        delta(
            "kvfs_s3_requests_total",
            &[("operation", "get"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "kvfs_s3_requests_total",
            &[("operation", "get"), ("outcome", "not_found")]
        ),
        1.0
    );
    assert_eq!(delta("kvfs_s3_fetches_total", &[("result", "hit")]), 1.0);
    assert_eq!(delta("kvfs_s3_fetches_total", &[("result", "miss")]), 1.0);
    assert!(fuse_reads(&after) > fuse_reads(&before));
    assert!(
        delta(
            "kvfs_fuse_operation_duration_seconds_count",
            &[("operation", "lookup")]
        ) >= 3.0
    );
    // Use against bounds is there.
    assert!(sum(&after, "kvfs_tier_used_bytes", &[("tier", "disk")]) > 0.0);
    assert!(
        sum(&after, "kvfs_tier_capacity_bytes", &[("tier", "disk")])
            >= sum(&after, "kvfs_tier_used_bytes", &[("tier", "disk")])
    );
    assert_eq!(sum(&after, "kvfs_upload_queue_depth", &[]), 0.0);

    // The same miss again is answered by the negative cache, without a request.
    assert!(std::fs::metadata(file(&missing)).is_err());
    let again = scrape_now(addr);
    assert_eq!(
        sum(&again, "kvfs_s3_negative_cache_hits_total", &[])
            - sum(&after, "kvfs_s3_negative_cache_hits_total", &[]),
        1.0
    );

    // S3 down: every GET answers 503. The failed fetch is an error, counted as such.
    proxy.always(Fault::Unavailable);
    let (other, _) = chunk(&spec, 400);
    assert!(std::fs::metadata(file(&other)).is_err());
    proxy.clear();
    let down = scrape_now(addr);
    assert!(
        sum(
            &down,
            "kvfs_s3_requests_total",
            &[("operation", "get"), ("outcome", "error")]
        ) >= 1.0
    );
    assert!(sum(&down, "kvfs_s3_fetches_total", &[("result", "error")]) >= 1.0);
    // The endpoint's other answers.
    assert!(matches!(scrape_http_status(addr, "/nope"), Some(404)));

    // `kvfs status` reads the same endpoint and sums it up.
    let o = Command::new(KVFS)
        .env_remove("KVFS_CACHE_DIR")
        .arg("--config")
        .arg(&cfg)
        .args(["status", "--metrics-addr", &addr.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("hit rate"), "{text}");
    assert!(
        text.contains("1 verification failures (1 quarantined)"),
        "{text}"
    );
    assert!(text.contains("upload      empty"), "{text}");
    let o = Command::new(KVFS)
        .env_remove("KVFS_CACHE_DIR")
        .arg("--config")
        .arg(&cfg)
        .args(["status", "--json", "--metrics-addr", &addr.to_string()])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["hits_remote"], 1.0);
    assert_eq!(doc["verify_failures"], 1.0);
}

/// The status line of `GET path` on `addr` (a raw HTTP/1.0 request: any client will do).
fn scrape_http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    resp.split_whitespace().nth(1)?.parse().ok()
}

/// 1,000 namespaces read from one store: the first 64 get their own `namespace` label, the
/// rest share `other`, and the totals still count every lookup.
#[test]
fn the_namespace_label_stays_bounded_with_1000_namespaces() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(StoreConfig::new(d.path())).unwrap();
    let key = ChunkKey([7; 32]);
    for i in 0..1000u64 {
        let ns = format!("model{i}-{i:016x}");
        assert!(store.get(&ns, &key).is_err());
    }
    let mut registry = kvfs::metrics::registry();
    store.register_metrics(&mut registry);
    let samples = scrape::parse(&kvfs::metrics::encode(&registry)).unwrap();
    let labels: HashSet<&str> = samples
        .iter()
        .filter(|s| s.name == "kvfs_lookups_total")
        .filter_map(|s| s.label("namespace"))
        .collect();
    assert_eq!(labels.len(), kvfs::metrics::DEFAULT_NAMESPACE_LABELS + 1);
    assert!(labels.contains(kvfs::metrics::OTHER_NAMESPACE));
    assert!(labels.contains("model0-0000000000000000"));
    assert_eq!(sum(&samples, "kvfs_lookups_total", &[]), 1000.0);
    assert_eq!(sum(&samples, "kvfs_misses_total", &[]), 1000.0);
    assert_eq!(
        sum(
            &samples,
            "kvfs_misses_total",
            &[("namespace", kvfs::metrics::OTHER_NAMESPACE)]
        ),
        (1000 - kvfs::metrics::DEFAULT_NAMESPACE_LABELS) as f64
    );
    // Every series of the whole exposition is bounded too: no other label grows with them.
    assert!(samples.len() < 400, "{} series", samples.len());
}

/// A metrics address that does not parse is a usage error (2); one already in use fails
/// the mount before it exists (1), naming the address; `kvfs status` without an address is
/// a usage error, and with nothing listening a failure that says so.
#[test]
fn bad_metrics_addresses_are_refused_with_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let mnt = d.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let kvfs = |args: &[&str]| {
        Command::new(KVFS)
            .env_remove("KVFS_METRICS_ADDR")
            .env_remove("KVFS_CONFIG")
            .arg("--cache-dir")
            .arg(d.path().join("cache"))
            .args(args)
            .output()
            .unwrap()
    };
    let m = mnt.to_str().unwrap();
    let o = kvfs(&["mount", m, "--metrics-addr", "nowhere:port"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a metrics address"));
    if support::require::fuse() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let o = kvfs(&["mount", m, "--metrics-addr", &addr]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("cannot serve metrics on"), "{err}");
        assert!(
            !kvfs_fs::is_mount_point(&mnt).unwrap(),
            "nothing was mounted"
        );
    }
    let o = kvfs(&["status"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no metrics address"));
    let o = kvfs(&["status", "--metrics-addr", &free_addr().to_string()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot reach the metrics endpoint"));
}

/// Every metric the daemon exports (store, S3 tier with its queue, mount) is in
/// docs/METRICS.md, and the Grafana dashboard queries only documented metrics.
#[test]
fn every_metric_is_documented_and_the_dashboard_names_only_real_ones() {
    let t = S3Target::new();
    let d = tempfile::tempdir().unwrap();
    kvfs::store::prepare_root(d.path(), Default::default()).unwrap();
    let remote = Arc::new(Remote::open(t.config(), Some(d.path())).unwrap());
    let mut sc = StoreConfig::new(d.path());
    sc.remote = Some(Arc::new(S3Tier::new(remote, Duration::from_secs(30))));
    let store = Store::open(sc).unwrap();
    let backend = kvfs::mount::StoreBackend::new(store.clone());
    let mut registry = kvfs::metrics::registry();
    backend.register_metrics(&mut registry);
    // Traffic, so that every family has a series: a miss (and its S3 GET), a put, a hit, a
    // gc, a FUSE request.
    let spec = ModelSpec::preset("tiny").unwrap();
    let ns = spec.namespace_dir();
    let (key, bytes) = chunk(&spec, 0);
    assert!(store.get(&ns, &ChunkKey([9; 32])).is_err());
    store.create_namespace(&ns, Some(&spec)).unwrap();
    store.put(&ns, &bytes).unwrap();
    store.get(&ns, &key).unwrap();
    store.gc().unwrap();
    kvfs_fs::ChunkBackend::observe_op(
        &backend,
        &kvfs_fs::OpReport {
            op: kvfs_fs::FsOp::Read,
            elapsed: Duration::from_micros(50),
            ok: true,
            bytes: 4096,
        },
    );
    let text = kvfs::metrics::encode(&registry);
    let exported: HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(exported.len() >= 25, "{exported:?}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/METRICS.md")).unwrap();
    let documented: HashSet<String> = doc
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.starts_with("kvfs_") && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .map(str::to_string)
        .collect();
    for f in &exported {
        assert!(documented.contains(*f), "{f} is not in docs/METRICS.md");
    }
    let dash = std::fs::read_to_string(root.join("docs/grafana-dashboard.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&dash).expect("the dashboard is JSON");
    assert!(json["panels"].as_array().is_some_and(|p| p.len() > 10));
    let mut used = 0;
    for (i, _) in dash.match_indices("kvfs_") {
        if dash[..i].ends_with("vllm:") {
            continue; // the connector's, tested in python/tests/test_stats.py
        }
        let name: String = dash[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let base = name.strip_suffix("_bucket").unwrap_or(&name);
        assert!(
            documented.contains(base),
            "the dashboard queries {name}, which is not a kvfs metric"
        );
        used += 1;
    }
    assert!(used >= 20, "{used}");
}
