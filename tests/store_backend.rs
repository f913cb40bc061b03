//! The tiered store's mount backend (`StoreBackend`) against the one `ChunkBackend`
//! conformance suite kvfs-fs runs against its in-memory backend (issue 15, item 2), plus what
//! only the store does: a chunk file that fails the mount's check is quarantined as
//! `kvfs verify` does.

use kvfs::config::Limit;
use kvfs::mount::StoreBackend;
use kvfs::store::{Store, StoreConfig};
use kvfs_fs::ChunkBackend;
use kvfs_fs::testing::conformance;
use std::sync::{Arc, Mutex};

fn store_backend(root: &std::path::Path, capacity: u64) -> StoreBackend {
    let mut cfg = StoreConfig::new(root);
    cfg.capacity = Limit::Bytes(capacity);
    // The suite's bounds are the capacity alone, whatever the temporary file system holds.
    cfg.min_free = Limit::Bytes(0);
    StoreBackend::new(Store::open(cfg).unwrap())
}

#[test]
fn store_backend_conforms() {
    // One fresh cache directory per case, all removed at the end.
    let dirs = Mutex::new(Vec::new());
    conformance::run(&|capacity| {
        let d = tempfile::tempdir().unwrap();
        let b = store_backend(d.path(), capacity);
        dirs.lock().unwrap().push(d);
        Arc::new(b) as Arc<dyn ChunkBackend>
    });
}

#[test]
fn quarantine_moves_the_file_aside_and_forgets_the_chunk() {
    let d = tempfile::tempdir().unwrap();
    let b = store_backend(d.path(), 1 << 30);
    let ns = conformance::namespace();
    b.create_namespace(&ns).unwrap();
    let (key, bytes) = conformance::chunk(1);
    conformance::commit(&b, &ns, &key, &bytes).unwrap();
    let path = b.store().backing_path(&ns, &key);
    let before = b.store().stats().verify_failures;
    let to = b.quarantine(&ns, &key, "test").expect("moved");
    assert!(
        to.starts_with(d.path().join(".quarantine").join(&ns)),
        "{to:?}"
    );
    assert!(std::fs::read(&to).unwrap() == bytes);
    assert!(!path.exists());
    assert!(b.stat(&ns, &key).unwrap().is_none());
    assert!(b.chunks(&ns).unwrap().is_empty());
    assert_eq!(b.store().stats().verify_failures, before + 1);
    // A planted symlink is moved as a link, never followed.
    let target = d.path().join("elsewhere");
    std::fs::write(&target, b"x").unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&target, &path).unwrap();
    assert!(matches!(
        b.open_local(&ns, &key),
        Err(kvfs_fs::BackendError::NotRegular(_))
    ));
    let to = b.quarantine(&ns, &key, "symlink").expect("moved");
    assert!(
        std::fs::symlink_metadata(&to)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(target.exists());
}
