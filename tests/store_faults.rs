//! Bad input and faults against the store: every one gets a typed error, leaves nothing
//! visible and loses nothing already committed. The full-disk tests mount a real, small tmpfs
//! (they need root; without it they print why they skip).

use kvfs::config::Limit;
use kvfs::store::{Store, StoreConfig, StoreError};
use kvfs_loader::{ChunkKey, FormatError, ModelSpec, SaltTag, synth_chunk};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn chunk_of(spec: &ModelSpec, seed: u64) -> (ChunkKey, Vec<u8>) {
    let t = kvfs::synth::prompt_tokens(seed, spec.chunk_tokens as usize);
    let (meta, bytes) = synth_chunk(spec, None, SaltTag::NONE, t).unwrap();
    (meta.key, bytes)
}

mod support {
    pub mod store;
}

use support::store::tiny;

fn cfg(root: &Path) -> StoreConfig {
    support::store::config(root, 1 << 30, 16 << 20)
}

/// Every regular file under `root` (relative paths) but the store's own index
/// (`.kvfs-index.sqlite` and its journal), for "nothing else became visible".
fn files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if !e
                .file_name()
                .to_string_lossy()
                .starts_with(".kvfs-index.sqlite")
            {
                out.push(e.path().strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// A store holding one committed chunk, for "loses nothing".
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: Store,
    ns: String,
    good: (ChunkKey, Vec<u8>),
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let store = Store::open(cfg(&root)).unwrap();
        let ns = tiny().namespace_dir();
        let good = chunk_of(&tiny(), 100);
        store.put(&ns, &good.1).unwrap();
        Fixture {
            _dir: dir,
            root,
            store,
            ns,
            good,
        }
    }

    /// `put` of `bytes` fails with a format error matching `want`; nothing changed on disk and
    /// the committed chunk still reads back.
    fn refuses(&self, bytes: &[u8], want: impl Fn(&FormatError) -> bool, what: &str) {
        let before = files(&self.root);
        match self.store.put(&self.ns, bytes) {
            Err(StoreError::Format { source, .. }) if want(&source) => {
                assert!(!source.to_string().is_empty())
            }
            other => panic!("{what}: unexpected {other:?}"),
        }
        assert_eq!(files(&self.root), before, "{what}: nothing may appear");
        assert_eq!(
            &self.store.get(&self.ns, &self.good.0).unwrap()[..],
            &self.good.1[..]
        );
    }
}

fn flip(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at] ^= 0x20;
    b
}

/// Rewrites the header checksum after an edit, as a forger would (offsets from
/// docs/FORMAT.md: checksum at 216..248, header length u32 at 12).
fn reseal(b: &mut [u8]) {
    let header_len = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    let mut h = blake3::Hasher::new();
    h.update(&b[..216]);
    h.update(&[0u8; 32]);
    h.update(&b[248..header_len]);
    b[216..248].copy_from_slice(h.finalize().as_bytes());
}

#[test]
fn truncated_chunks_are_refused() {
    let f = Fixture::new();
    let (_, b) = chunk_of(&tiny(), 1);
    for cut in [0, 7, 100, 4095, 5000, b.len() - 1] {
        f.refuses(
            &b[..cut],
            |e| matches!(e, FormatError::Truncated { .. }),
            &format!("cut at {cut}"),
        );
    }
    let mut long = b.clone();
    long.push(0);
    f.refuses(
        &long,
        |e| matches!(e, FormatError::SizeMismatch { .. }),
        "trailing byte",
    );
}

#[test]
fn wrong_magic_version_and_header_checksum_are_refused() {
    let f = Fixture::new();
    let (_, b) = chunk_of(&tiny(), 2);
    f.refuses(
        &flip(&b, 0),
        |e| matches!(e, FormatError::BadMagic { .. }),
        "magic",
    );
    let mut v = b.clone();
    v[8] = 9;
    f.refuses(
        &v,
        |e| matches!(e, FormatError::UnsupportedVersion { found: 9, .. }),
        "version",
    );
    // A token id (inside the checksummed header) flipped.
    f.refuses(
        &flip(&b, 300),
        |e| matches!(e, FormatError::HeaderChecksum),
        "header byte",
    );
}

#[test]
fn payload_digest_mismatch_is_refused() {
    let f = Fixture::new();
    let (_, b) = chunk_of(&tiny(), 3);
    for at in [4096, 4096 + 70_000, b.len() - 1] {
        f.refuses(
            &flip(&b, at),
            |e| {
                matches!(
                    e,
                    FormatError::PayloadDigest { .. } | FormatError::NonZeroPadding { .. }
                )
            },
            &format!("payload byte {at}"),
        );
    }
    // Large enough for the parallel verifier (several threads, several layers).
    let big = ModelSpec::preset("smollm2-135m").unwrap();
    let (_, b) = chunk_of(&big, 4);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(cfg(dir.path())).unwrap();
    let bad = flip(&b, b.len() - 5000);
    match store.put(&big.namespace_dir(), &bad) {
        Err(StoreError::Format {
            source: FormatError::PayloadDigest { layer },
            ..
        }) => assert_eq!(layer, big.num_layers - 1),
        other => panic!("unexpected {other:?}"),
    }
    assert!(files(dir.path()).is_empty(), "nothing visible");
    store.put(&big.namespace_dir(), &b).unwrap();
}

#[test]
fn key_that_does_not_match_tokens_is_refused() {
    let f = Fixture::new();
    let (_, b) = chunk_of(&tiny(), 5);
    let mut forged = b.clone();
    forged[88] ^= 1; // the stored key (offset 88), header resealed
    reseal(&mut forged);
    f.refuses(
        &forged,
        |e| matches!(e, FormatError::KeyMismatch { .. }),
        "forged key",
    );
    let mut forged = b.clone();
    forged[248] ^= 1; // first token id, header resealed: key no longer matches tokens
    reseal(&mut forged);
    f.refuses(
        &forged,
        |e| matches!(e, FormatError::KeyMismatch { .. }),
        "forged token",
    );
}

#[test]
fn chunk_of_another_namespace_is_refused() {
    let f = Fixture::new();
    let (_, b) = chunk_of(&tiny(), 6);
    let llama_dir = ModelSpec::preset("llama-3-8b").unwrap().namespace_dir();
    let before = files(&f.root);
    assert!(matches!(
        f.store.put(&llama_dir, &b),
        Err(StoreError::NamespaceMismatch { .. })
    ));
    assert_eq!(files(&f.root), before);
    // A chunk placed by hand under the wrong namespace is not served from it.
    let (k, _) = (f.good.0, ());
    let wrong = Layout::path(&f.root, &llama_dir, &k);
    fs::create_dir_all(wrong.parent().unwrap()).unwrap();
    fs::write(&wrong, &f.good.1).unwrap();
    let mut c = cfg(&f.root);
    c.memory_bytes = 0;
    let s2 = Store::open(c).unwrap();
    assert!(matches!(
        s2.get(&llama_dir, &k),
        Err(StoreError::NamespaceMismatch { .. })
    ));
}

struct Layout;
impl Layout {
    fn path(root: &Path, ns: &str, key: &ChunkKey) -> PathBuf {
        kvfs_loader::dir::Layout::Cache.chunk_path(root, ns, key)
    }
}

#[test]
fn file_under_a_wrong_name_is_refused_on_read() {
    let f = Fixture::new();
    let (k2, b2) = chunk_of(&tiny(), 7);
    // The file named k2 holds the bytes of the committed chunk.
    let p = Layout::path(&f.root, &f.ns, &k2);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, &f.good.1).unwrap();
    let mut c = cfg(&f.root);
    c.memory_bytes = 0;
    let s2 = Store::open(c).unwrap();
    for r in [
        s2.get(&f.ns, &k2).map(|_| ()),
        s2.stat(&f.ns, &k2).map(|_| ()),
        s2.read_at(&f.ns, &k2, 0, &mut [0u8; 16]).map(|_| ()),
    ] {
        assert!(
            matches!(
                r,
                Err(StoreError::Format {
                    source: FormatError::NameMismatch { .. },
                    path: Some(_)
                })
            ),
            "{r:?}"
        );
    }
    let _ = b2;
}

#[test]
fn corruption_on_disk_is_caught_by_reads() {
    let f = Fixture::new();
    let p = f.store.backing_path(&f.ns, &f.good.0);
    fs::remove_file(&p).unwrap();
    fs::write(&p, flip(&f.good.1, 5000)).unwrap();
    let open = |memory: u64, verify_reads: bool| {
        let mut c = cfg(&f.root);
        c.memory_bytes = memory;
        c.verify_reads = verify_reads;
        Store::open(c).unwrap()
    };
    let is_digest = |r: Result<bytes::Bytes, StoreError>| matches!(r, Err(StoreError::Format { source: FormatError::PayloadDigest { .. }, path: Some(ref p) }) if p.ends_with(f.good.0.file_name()));
    // Promotion to memory always verifies; so does verify_reads; so does get_with(Full).
    assert!(is_digest(open(1 << 20, false).get(&f.ns, &f.good.0)));
    assert!(is_digest(open(0, true).get(&f.ns, &f.good.0)));
    assert!(is_digest(open(0, false).get_with(
        &f.ns,
        &f.good.0,
        kvfs_loader::Verify::Full
    )));
    // A ranged read with verify_reads checks the layers it touches, and only those.
    let ranged = open(0, true);
    assert!(matches!(
        ranged.read_at(&f.ns, &f.good.0, 4000, &mut [0u8; 2000]),
        Err(StoreError::Format {
            source: FormatError::PayloadDigest { layer: 0 },
            ..
        })
    ));
    let layer1 = 4096 + 2 * 65536;
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        ranged.read_at(&f.ns, &f.good.0, layer1, &mut buf).unwrap(),
        4096
    );
    assert_eq!(buf, f.good.1[layer1 as usize..layer1 as usize + 4096]);
    // Without verify_reads a ranged read checks the header only.
    assert!(
        open(0, false)
            .read_at(&f.ns, &f.good.0, 4000, &mut [0u8; 2000])
            .is_ok()
    );
    // Header checks happen on every read.
    fs::remove_file(&p).unwrap();
    fs::write(&p, flip(&f.good.1, 250)).unwrap();
    let s = open(0, false);
    assert!(matches!(
        s.get(&f.ns, &f.good.0),
        Err(StoreError::Format {
            source: FormatError::HeaderChecksum,
            ..
        })
    ));
    assert!(matches!(
        s.read_at(&f.ns, &f.good.0, 0, &mut [0u8; 8]),
        Err(StoreError::Format {
            source: FormatError::HeaderChecksum,
            ..
        })
    ));
    assert!(s.stats().verify_failures >= 2);
    // Truncated on disk.
    fs::remove_file(&p).unwrap();
    fs::write(&p, &f.good.1[..f.good.1.len() - 4096]).unwrap();
    assert!(matches!(
        open(0, false).get(&f.ns, &f.good.0),
        Err(StoreError::Format {
            source: FormatError::Truncated { .. },
            ..
        })
    ));
}

#[test]
fn path_traversal_in_namespace_is_refused() {
    let f = Fixture::new();
    let k = f.good.0;
    let before = files(&f.root);
    for bad in [
        "",
        "..",
        "../x-0123456789abcdef",
        "a/b-0123456789abcdef",
        "/etc-0123456789abcdef",
        "x\0-0123456789abcdef",
        ".quarantine",
        "Upper-0123456789abcdef",
        "x-0123",
    ] {
        let is_bad = |r: &Result<(), StoreError>| matches!(r, Err(StoreError::BadNamespace(_)));
        assert!(is_bad(&f.store.put(bad, &f.good.1).map(|_| ())), "{bad:?}");
        assert!(is_bad(&f.store.get(bad, &k).map(|_| ())), "{bad:?}");
        assert!(is_bad(&f.store.stat(bad, &k).map(|_| ())), "{bad:?}");
        assert!(is_bad(&f.store.remove(bad, &k).map(|_| ())), "{bad:?}");
        assert!(is_bad(&f.store.chunks(bad).map(|_| ())), "{bad:?}");
        assert!(is_bad(&f.store.create_namespace(bad, None)), "{bad:?}");
        assert!(
            is_bad(&f.store.read_at(bad, &k, 0, &mut [0u8; 4]).map(|_| ())),
            "{bad:?}"
        );
        assert!(!f.store.contains(bad, &k));
    }
    assert_eq!(files(&f.root), before);
}

#[test]
fn names_that_are_not_keys_are_refused() {
    for bad in [
        "",
        "abc",
        "../../etc/passwd",
        &"G".repeat(64),
        &"ab".repeat(33),
    ] {
        assert!(
            matches!(ChunkKey::from_hex(bad), Err(FormatError::BadKey(_))),
            "{bad}"
        );
    }
    // Files with such names in the cache are ignored by listings.
    let f = Fixture::new();
    let fan = f.root.join(&f.ns).join("ab");
    fs::create_dir_all(&fan).unwrap();
    fs::write(fan.join("passwd"), b"x").unwrap();
    fs::write(fan.join(format!("{}.kvc", "ab".repeat(31))), b"x").unwrap();
    assert_eq!(f.store.chunks(&f.ns).unwrap().len(), 1);
}

/// Mounts a tmpfs of `size` at a fresh directory; None (with a message) where that is not
/// possible here.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            Ok(o) => {
                eprintln!(
                    "SKIP: cannot mount a tmpfs (needs root): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIP: cannot run mount: {e}");
                None
            }
        }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn real_enospc_is_no_space_and_leaves_nothing() {
    let Some(t) = Tmpfs::mount("2m") else { return };
    let root = t.path().join("cache");
    let store = Store::open(cfg(&root)).unwrap(); // min_free 0: the file system decides
    let ns = tiny().namespace_dir();
    let small: Vec<_> = (0..2).map(|i| chunk_of(&tiny(), 200 + i)).collect();
    for (_, b) in &small {
        store.put(&ns, b).unwrap();
    }
    // 11 MiB chunk on a 2 MiB file system: the write itself fails with ENOSPC.
    let big_spec = ModelSpec::preset("smollm2-135m").unwrap();
    let (bk, big) = chunk_of(&big_spec, 9);
    let before = files(&root);
    let e = store.put(&big_spec.namespace_dir(), &big).unwrap_err();
    assert!(
        matches!(e, StoreError::NoSpace { needed, .. } if needed == big.len() as u64),
        "{e}"
    );
    assert!(e.to_string().contains("no space"), "{e}");
    let after = files(&root);
    assert!(
        after.iter().all(|p| before.contains(p)),
        "nothing half-written visible: {after:?}"
    );
    assert!(!store.contains(&big_spec.namespace_dir(), &bk));
    for (k, b) in &small {
        assert_eq!(
            &store.get(&ns, k).unwrap()[..],
            &b[..],
            "a hopeless put evicts nothing"
        );
    }
}

#[test]
fn enospc_evicts_cold_chunks_and_retries() {
    let Some(t) = Tmpfs::mount("2m") else { return };
    let root = t.path().join("cache");
    let mut c = cfg(&root);
    c.memory_bytes = 0;
    let store = Store::open(c).unwrap();
    let ns = tiny().namespace_dir();
    // ~266 KiB each: about 7 fit; the capacity bound never triggers, ENOSPC does.
    let cs: Vec<_> = (0..12).map(|i| chunk_of(&tiny(), 300 + i)).collect();
    for (_, b) in &cs {
        store.put(&ns, b).unwrap();
    }
    assert!(store.stats().evictions > 0);
    assert!(store.contains(&ns, &cs[11].0), "the newest chunk is there");
    assert!(!store.contains(&ns, &cs[0].0), "the oldest went first");
    let r = store.verify_all(&|_, _| {}).unwrap();
    assert!(r.bad.is_empty() && r.ok > 0);
}

#[test]
fn min_free_is_enforced_before_writing() {
    let Some(t) = Tmpfs::mount("2m") else { return };
    let root = t.path().join("cache");
    let mut c = cfg(&root);
    c.min_free = Limit::Bytes(1900 << 10);
    let store = Store::open(c).unwrap();
    let ns = tiny().namespace_dir();
    let (_, b) = chunk_of(&tiny(), 400);
    let e = store.put(&ns, &b).unwrap_err();
    assert!(matches!(e, StoreError::NoSpace { .. }), "{e}");
    assert!(files(&root).is_empty());
    // As a percentage of the file system, too.
    let mut c = cfg(&root);
    c.min_free = Limit::Percent(95.0);
    let store = Store::open(c).unwrap();
    assert!(matches!(
        store.put(&ns, &b),
        Err(StoreError::NoSpace { .. })
    ));
}

#[test]
fn a_cache_on_a_read_only_file_system_still_serves_reads() {
    let Some(t) = Tmpfs::mount("8m") else { return };
    let root = t.path().join("cache");
    let ns = tiny().namespace_dir();
    let cs: Vec<_> = (0..3).map(|i| chunk_of(&tiny(), 500 + i)).collect();
    {
        let store = Store::open(cfg(&root)).unwrap();
        for (_, b) in &cs {
            store.put(&ns, b).unwrap();
        }
    }
    let ro = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(t.path())
        .status()
        .unwrap();
    assert!(ro.success(), "remount read-only");
    // The index cannot be written here: reads go on without it.
    let store = Store::open(cfg(&root)).unwrap();
    for (k, b) in &cs {
        assert!(
            store.get(&ns, k).unwrap() == b[..],
            "served from a read-only cache"
        );
        assert!(store.contains(&ns, k));
    }
    let (_, extra) = chunk_of(&tiny(), 600);
    assert!(
        store.put(&ns, &extra).is_err(),
        "a put fails, as the file system says"
    );
}
