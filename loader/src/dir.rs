//! Chunk directories on a local file system: where a chunk lives and how one is committed.
//!
//! Two layouts hold the same chunks:
//! - a **cache directory** (the disk tier): `<root>/<namespace>/<key[0..2]>/<key>.kvc`, fanned
//!   out by the first byte of the key so no directory grows past a few thousand entries;
//! - the **mounted view** (`/kvfs`): `<root>/<namespace>/<key>.kvc`, flat, which is what
//!   people and engines see.
//!
//! A namespace directory is `<slug>-<16 hex>`; the 16 hex digits (a prefix of the namespace
//! id) are its identity and the slug is for people, so [`find_namespace_dir`] matches by the
//! suffix. Both the store's disk tier and the loader's `store` commit chunks through
//! [`commit_file`]: write a temporary file beside the target, optionally fsync it, then
//! hard-link it into place, which is atomic and never replaces an existing file, so two
//! writers of one key end with exactly one complete file and a reader never sees a partial
//! one. Temporary files are named `.tmp-*` and are swept by [`sweep_temporaries`] at start.
//!
//! **Permissions follow the cache root.** Chunk headers hold a prompt's token ids, so a cache
//! is private by default: [`prepare_root`] makes the root `0700` ([`Access::Private`]) or
//! `2770`, set-group-id, for a cache shared by one group ([`Access::Group`]), and tightens an
//! existing root that grants more. Everything created beneath takes its bits from the
//! directory it is created in ([`create_dirs`], [`file_mode_in`]): directories copy their
//! parent's mode, files get `0600` plus the read bits the directory grants its group and
//! others. So one decision, at the root, covers chunks, namespaces, the upload queue and the
//! quarantine, whoever writes them (the daemon, `kvfs put`, or an engine's loader).

use crate::identity::{STATS_FILE, STATUS_DIR, namespace_matches};
use crate::key::ChunkKey;
use crate::spec::{NamespaceId, validate_namespace_dir};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Prefix of temporary files; no chunk name can start with it.
pub const TMP_PREFIX: &str = ".tmp-";

/// Which of the two layouts a root directory uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `<root>/<ns>/<key[0..2]>/<key>.kvc`
    Cache,
    /// `<root>/<ns>/<key>.kvc`
    Flat,
}

impl Layout {
    /// Path of a chunk under `root`.
    pub fn chunk_path(self, root: &Path, ns_dir: &str, key: &ChunkKey) -> PathBuf {
        match self {
            Layout::Cache => root
                .join(ns_dir)
                .join(&key.to_hex()[..2])
                .join(key.file_name()),
            Layout::Flat => root.join(ns_dir).join(key.file_name()),
        }
    }

    /// The layout of an existing root: a kvfs mount shows a `.kvfs` status directory.
    pub fn detect(root: &Path) -> Layout {
        if root.join(STATUS_DIR).join(STATS_FILE).exists() {
            Layout::Flat
        } else {
            Layout::Cache
        }
    }
}

/// The namespace directory under `root` whose name ends in the first 16 hex digits of `ns`.
pub fn find_namespace_dir(root: &Path, ns: &NamespaceId) -> io::Result<Option<String>> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let name = entry?.file_name();
        if let Some(name) = name.to_str()
            && namespace_matches(name, ns)
            && validate_namespace_dir(name).is_ok()
        {
            return Ok(Some(name.to_string()));
        }
    }
    Ok(None)
}

/// Outcome of [`commit_file`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// This call created the file.
    Created,
    /// A file of that name already existed (written by another writer); it was kept.
    AlreadyExists,
}

/// Who may read a cache directory besides its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Access {
    /// Only the owner (root `0700`, files `0600`): the default.
    #[default]
    Private,
    /// The owner and the root directory's group (root `2770`, set-group-id so everything
    /// beneath keeps the group; files `0640`): engines running as other users of that group
    /// read and store chunks in the cache directory directly.
    Group,
}

impl Access {
    /// Mode of the cache root.
    pub fn root_mode(self) -> u32 {
        match self {
            Access::Private => 0o700,
            Access::Group => 0o2770,
        }
    }
}

/// Creates `root` if needed with the mode `access` asks for, and tightens an existing root
/// that grants more (a cache made before kvfs was private by default, or made by hand).
/// Returns the old mode when it changed one, so the caller can log it. A root that grants
/// less than asked (`0700` when `Group` is configured) is widened only to what `access` says.
pub fn prepare_root(root: &Path, access: Access) -> io::Result<Option<u32>> {
    let want = access.root_mode();
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(want & 0o777)
        .create(root)
    {
        Ok(()) => {}
        Err(e) => return Err(e),
    }
    let have = fs::metadata(root)?.permissions().mode() & 0o7777;
    if have == want {
        return Ok(None);
    }
    fs::set_permissions(root, fs::Permissions::from_mode(want))?;
    Ok(Some(have))
}

/// Mode of a file created in `dir`: read-write for the owner, plus the read bits `dir`
/// grants its group and others (so `0600` in a private cache, `0640` in a group one).
pub fn file_mode_in(dir: &Path) -> u32 {
    let dir_mode = fs::metadata(dir).map_or(0, |m| m.permissions().mode());
    0o600 | (dir_mode & 0o044)
}

/// `create_dir_all` whose new directories copy the mode of the nearest existing ancestor
/// exactly (see the module docs), whatever the process umask says.
pub fn create_dirs(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = dir;
    let mode = loop {
        match fs::metadata(cur) {
            Ok(m) if m.is_dir() => break m.permissions().mode() & 0o7777,
            Ok(_) => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(cur),
            Err(e) => return Err(e),
        }
        match cur.parent() {
            Some(p) if !p.as_os_str().is_empty() => cur = p,
            _ => break 0o700,
        }
    };
    for d in missing.into_iter().rev() {
        match fs::DirBuilder::new().mode(mode & 0o777).create(d) {
            Ok(()) => fs::set_permissions(d, fs::Permissions::from_mode(mode))?,
            // Another writer made it first; it made it the same way.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A temporary file name unique across processes and threads.
pub fn temp_path_for(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("chunk");
    let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
    target.with_file_name(format!("{TMP_PREFIX}{name}.{}.{seq}", std::process::id()))
}

/// Writes `bytes` to `target` atomically and without replacing an existing file.
///
/// Creates missing parent directories. With `fsync`, the file and its directory are synced
/// before this returns, so a committed chunk survives power loss. On any error nothing is
/// left behind (the temporary file is removed).
pub fn commit_file(target: &Path, bytes: &[u8], fsync: bool) -> io::Result<Commit> {
    commit_with(target, fsync, |f| f.write_all(bytes))
}

/// Like [`commit_file`], with the content produced by `write` into the temporary file.
pub fn commit_with(
    target: &Path,
    fsync: bool,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<Commit> {
    let parent = target
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "target has no parent"))?;
    if target.exists() {
        return Ok(Commit::AlreadyExists);
    }
    create_dirs(parent)?;
    let tmp = temp_path_for(target);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(file_mode_in(parent))
            .open(&tmp)?;
        write(&mut f)?;
        if fsync {
            f.sync_all()?;
        }
        drop(f);
        match fs::hard_link(&tmp, target) {
            Ok(()) => {
                if fsync {
                    File::open(parent)?.sync_all()?;
                }
                Ok(Commit::Created)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Commit::AlreadyExists),
            Err(e) => Err(e),
        }
    })();
    let _ = fs::remove_file(&tmp);
    result
}

/// Like [`commit_file`], for content already complete in the file `src` on the same file
/// system (a chunk written through the mount): `src` is hard-linked to `target`, never copied,
/// and left in place for the caller to remove. With `fsync`, `src` is synced before the link
/// and the directory after it.
pub fn commit_link(src: &Path, target: &Path, fsync: bool) -> io::Result<Commit> {
    let parent = target
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "target has no parent"))?;
    if target.exists() {
        return Ok(Commit::AlreadyExists);
    }
    create_dirs(parent)?;
    if fsync {
        File::open(src)?.sync_all()?;
    }
    match fs::hard_link(src, target) {
        Ok(()) => {
            if fsync {
                File::open(parent)?.sync_all()?;
            }
            Ok(Commit::Created)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Commit::AlreadyExists),
        Err(e) => Err(e),
    }
}

/// Pid of the process that created the temporary file `name` (see [`temp_path_for`]:
/// `.tmp-<target name>.<pid>.<seq>`), if the name has that form.
pub fn temp_writer_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(TMP_PREFIX)?;
    let mut parts = rest.rsplitn(3, '.');
    let (_seq, pid) = (parts.next()?, parts.next()?);
    pid.parse::<i32>().ok().filter(|p| *p > 0)
}

/// Whether process `pid` exists and is not a zombie (a killed writer whose parent has not
/// reaped it yet is dead for our purposes).
pub fn process_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 sends nothing; it only checks whether `pid` exists.
    let exists = unsafe { libc::kill(pid, 0) } == 0
        || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH);
    if !exists {
        return false;
    }
    // `/proc/<pid>/stat` is `pid (comm) S ...`; the state follows the last `)`.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// Removes temporary files left by interrupted writers under `dir` (recursively, three levels
/// at most): those whose writer process is gone (so a writer killed mid-put leaves nothing
/// behind once any process looks), and those older than `min_age` whatever their name says
/// (a pid may have been reused). A live writer's file younger than `min_age` is kept.
/// Returns how many were removed.
pub fn sweep_temporaries(dir: &Path, min_age: std::time::Duration) -> io::Result<usize> {
    let mut removed = 0;
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        let entries = match fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let ft = entry.file_type()?;
            if ft.is_dir() && depth < 3 {
                stack.push((entry.path(), depth + 1));
                continue;
            }
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !ft.is_file() || !name.starts_with(TMP_PREFIX) {
                continue;
            }
            let writer_gone = temp_writer_pid(name).is_some_and(|pid| !process_alive(pid));
            let old = || {
                entry
                    .metadata()
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .and_then(|m| m.elapsed().ok())
                    .is_none_or(|age| age >= min_age)
            };
            if (writer_gone || old()) && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_private_root_makes_everything_beneath_private() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("cache");
        assert_eq!(prepare_root(&root, Access::Private).unwrap(), None);
        assert_eq!(mode_of(&root), 0o700);
        let target = Layout::Cache.chunk_path(&root, "ns-0123456789abcdef", &ChunkKey([7; 32]));
        commit_file(&target, b"x", false).unwrap();
        assert_eq!(mode_of(&target), 0o600);
        assert_eq!(mode_of(target.parent().unwrap()), 0o700);
        assert_eq!(mode_of(&root.join("ns-0123456789abcdef")), 0o700);
    }

    #[test]
    fn an_open_existing_root_is_tightened_and_reported() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("cache");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(prepare_root(&root, Access::Private).unwrap(), Some(0o755));
        assert_eq!(mode_of(&root), 0o700);
        assert_eq!(prepare_root(&root, Access::Private).unwrap(), None);
    }

    #[test]
    fn a_group_root_shares_chunks_with_its_group_only() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("cache");
        prepare_root(&root, Access::Group).unwrap();
        assert_eq!(mode_of(&root), 0o2770);
        let target = Layout::Cache.chunk_path(&root, "ns-0123456789abcdef", &ChunkKey([8; 32]));
        commit_file(&target, b"x", false).unwrap();
        assert_eq!(mode_of(&target), 0o640);
        // Set-group-id propagates to new directories, so the group stays the root's.
        assert_eq!(mode_of(target.parent().unwrap()) & 0o2070, 0o2070);
    }

    #[test]
    fn commit_is_create_once() {
        let d = tempfile::tempdir().unwrap();
        let t = d
            .path()
            .join("ns-0123456789abcdef")
            .join("ab")
            .join("x.kvc");
        assert_eq!(commit_file(&t, b"one", true).unwrap(), Commit::Created);
        assert_eq!(
            commit_file(&t, b"two", false).unwrap(),
            Commit::AlreadyExists
        );
        assert_eq!(fs::read(&t).unwrap(), b"one");
        let leftovers: Vec<_> = fs::read_dir(t.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file may remain");
    }

    #[test]
    fn commit_link_is_create_once() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("incoming");
        fs::write(&src, b"one").unwrap();
        let t = d
            .path()
            .join("ns-0123456789abcdef")
            .join("ab")
            .join("x.kvc");
        assert_eq!(commit_link(&src, &t, true).unwrap(), Commit::Created);
        fs::write(d.path().join("other"), b"two").unwrap();
        assert_eq!(
            commit_link(&d.path().join("other"), &t, false).unwrap(),
            Commit::AlreadyExists
        );
        assert_eq!(fs::read(&t).unwrap(), b"one");
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("x.kvc");
        let r = commit_with(&t, false, |f| {
            f.write_all(b"partial")?;
            Err(io::Error::other("disk full"))
        });
        assert!(r.is_err());
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn sweep_removes_dead_writers_files_at_once() {
        let d = tempfile::tempdir().unwrap();
        let t = d.path().join("k.kvc");
        let mine = temp_path_for(&t);
        fs::write(&mine, b"live writer").unwrap();
        // pid 0x7fff_fff0 does not exist (above any pid_max)
        let dead = d.path().join(".tmp-k.kvc.2147483632.0");
        fs::write(&dead, b"killed writer").unwrap();
        assert_eq!(temp_writer_pid(".tmp-k.kvc.2147483632.0"), Some(2147483632));
        assert_eq!(
            sweep_temporaries(d.path(), std::time::Duration::from_secs(3600)).unwrap(),
            1
        );
        assert!(mine.exists() && !dead.exists());
    }

    #[test]
    fn sweep_removes_only_temporaries() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("ns").join("ab");
        fs::create_dir_all(&sub).unwrap();
        fs::write(sub.join(".tmp-x.kvc.1.1"), b"junk").unwrap();
        fs::write(sub.join("k.kvc"), b"keep").unwrap();
        assert_eq!(
            sweep_temporaries(d.path(), std::time::Duration::ZERO).unwrap(),
            1
        );
        assert!(sub.join("k.kvc").exists());
    }
}
