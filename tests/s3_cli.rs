//! `kvfs` commands on a host that has never seen a namespace the bucket holds. Runs against
//! the in-process S3 server, or Garage when `KVFS_TEST_S3_ENDPOINT` is set.

mod support {
    pub mod s3_server;
}

use kvfs::remote_tier::S3Tier;
use kvfs::{Store, StoreConfig};
use kvfs_loader::{ModelSpec, SaltTag, synth_chunk};
use kvfs_remote::Remote;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use support::s3_server::S3Target;

fn config_file(path: &Path, cache: &Path, t: &S3Target) {
    std::fs::write(
        path,
        format!(
            "cache_dir = {cache:?}\nfsync = \"never\"\n\n[s3]\nurl = \"s3://{}/{}\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            t.bucket, t.prefix, t.endpoint, t.region, t.access_key, t.secret_key
        ),
    )
    .unwrap();
}

/// `kvfs get KEY` (a bare key, no namespace) on an empty host finds the chunk in the bucket,
/// as a mount's lookup does; a key nobody stored is still "not found", naming the bucket.
#[test]
fn a_bare_key_is_found_in_the_bucket_from_an_empty_host() {
    let t = S3Target::new();
    let d = tempfile::tempdir().unwrap();
    let spec = ModelSpec::preset("tiny").unwrap();
    let ns = spec.namespace_dir();
    let (meta, bytes) = synth_chunk(&spec, None, SaltTag::NONE, (0..256).collect()).unwrap();
    {
        // As the CLI does: the root is made private before the tier makes its queue there.
        kvfs::store::prepare_root(&d.path().join("a"), Default::default()).unwrap();
        let remote = Arc::new(Remote::open(t.config(), Some(&d.path().join("a"))).unwrap());
        let mut sc = StoreConfig::new(d.path().join("a"));
        sc.remote = Some(Arc::new(S3Tier::new(
            remote.clone(),
            Duration::from_secs(30),
        )));
        let a = Store::open(sc).unwrap();
        a.create_namespace(&ns, Some(&spec)).unwrap();
        a.put(&ns, &bytes).unwrap();
        assert!(remote.wait_uploaded(Duration::from_secs(30)));
        // The upload queue is as private as the cache.
        let queue = d.path().join("a").join(kvfs_remote::queue::UPLOADS_DIR);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&queue).unwrap().permissions(),
        );
        assert_eq!(mode & 0o7777, 0o700, "{}", queue.display());
    }
    let cfg = d.path().join("b.toml");
    config_file(&cfg, &d.path().join("b"), &t);
    let out = d.path().join("out.kvc");
    let o = Command::new(env!("CARGO_BIN_EXE_kvfs"))
        .env_remove("KVFS_CACHE_DIR")
        .env_remove("KVFS_S3")
        .arg("--config")
        .arg(&cfg)
        .args(["get", &meta.key.to_hex(), "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
    // The CLI made host B's cache, and its upload queue, private.
    for dir in [
        d.path().join("b"),
        d.path().join("b").join(kvfs_remote::queue::UPLOADS_DIR),
    ] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&dir).unwrap().permissions(),
        );
        assert_eq!(mode & 0o7777, 0o700, "{}", dir.display());
    }

    let o = Command::new(env!("CARGO_BIN_EXE_kvfs"))
        .env_remove("KVFS_CACHE_DIR")
        .env_remove("KVFS_S3")
        .arg("--config")
        .arg(&cfg)
        .args(["get", &"ab".repeat(32)])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("nor in the bucket"), "{err}");
}
