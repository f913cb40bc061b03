//! Inode numbers for the mounted view.
//!
//! The view is two levels deep (`/<namespace>/<key>.kvc`) plus a fixed status directory, so
//! a node is fully named by `(namespace, optional key)`. Fixed nodes have fixed numbers; a
//! namespace or chunk gets the next free number the first time the kernel sees it and keeps it
//! for the life of the mount, so a name always maps to the same inode (chunks are
//! content-addressed: the same name is the same bytes, which is what makes `FOPEN_KEEP_CACHE`
//! safe even across an unlink and a re-create). The table only grows; a node costs about 100
//! bytes, so a million chunks seen in one mount cost ~100 MB, and a restart of the daemon
//! resets it.

use kvfs_loader::ChunkKey;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Root directory.
pub const ROOT_INO: u64 = 1;
/// `/.kvfs`, the read-only status directory.
pub const STATUS_DIR_INO: u64 = 2;
/// `/.kvfs/stats.json`: the store's statistics.
pub const STATS_INO: u64 = 3;
/// `/.kvfs/mount.json`: how this mount runs (passthrough negotiated, options, counters).
pub const MOUNT_INFO_INO: u64 = 4;
/// First number handed out to namespaces and chunks.
const FIRST_DYNAMIC_INO: u64 = 16;

/// Names of the status directory under the root and of its files (one definition, in kvfs-loader).
pub use kvfs_loader::identity::{MOUNT_INFO_FILE, STATS_FILE, STATUS_DIR};

/// What an inode number stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Root,
    StatusDir,
    StatusFile(u64),
    Namespace(Arc<str>),
    Chunk { ns: Arc<str>, key: ChunkKey },
}

#[derive(Default)]
struct Table {
    by_ino: HashMap<u64, Node>,
    namespaces: HashMap<Arc<str>, u64>,
    chunks: HashMap<(Arc<str>, ChunkKey), u64>,
    next: u64,
}

/// Thread-safe map between inode numbers and nodes.
pub struct Inodes {
    table: RwLock<Table>,
}

impl Default for Inodes {
    fn default() -> Self {
        Self::new()
    }
}

impl Inodes {
    pub fn new() -> Self {
        Inodes {
            table: RwLock::new(Table {
                next: FIRST_DYNAMIC_INO,
                ..Table::default()
            }),
        }
    }

    /// The node of an inode number, if it was handed out.
    pub fn get(&self, ino: u64) -> Option<Node> {
        match ino {
            ROOT_INO => Some(Node::Root),
            STATUS_DIR_INO => Some(Node::StatusDir),
            STATS_INO | MOUNT_INFO_INO => Some(Node::StatusFile(ino)),
            _ => self.table.read().unwrap().by_ino.get(&ino).cloned(),
        }
    }

    /// Inode of a namespace directory, allocated on first use.
    pub fn namespace(&self, ns: &str) -> (u64, Arc<str>) {
        if let Some((name, ino)) = self.table.read().unwrap().namespaces.get_key_value(ns) {
            return (*ino, name.clone());
        }
        let mut t = self.table.write().unwrap();
        if let Some((name, ino)) = t.namespaces.get_key_value(ns) {
            return (*ino, name.clone());
        }
        let name: Arc<str> = Arc::from(ns);
        let ino = t.next;
        t.next += 1;
        t.namespaces.insert(name.clone(), ino);
        t.by_ino.insert(ino, Node::Namespace(name.clone()));
        (ino, name)
    }

    /// Inode of a chunk, allocated on first use.
    pub fn chunk(&self, ns: &Arc<str>, key: &ChunkKey) -> u64 {
        let k = (ns.clone(), *key);
        if let Some(ino) = self.table.read().unwrap().chunks.get(&k) {
            return *ino;
        }
        let mut t = self.table.write().unwrap();
        if let Some(ino) = t.chunks.get(&k) {
            return *ino;
        }
        let ino = t.next;
        t.next += 1;
        t.chunks.insert(k, ino);
        t.by_ino.insert(
            ino,
            Node::Chunk {
                ns: ns.clone(),
                key: *key,
            },
        );
        ino
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_their_numbers() {
        let t = Inodes::new();
        let (a, ns) = t.namespace("m-0123456789abcdef");
        assert_eq!(t.namespace("m-0123456789abcdef").0, a);
        let k = ChunkKey([7; 32]);
        let c = t.chunk(&ns, &k);
        assert_ne!(a, c);
        assert_eq!(t.chunk(&ns, &k), c);
        assert_eq!(t.get(c), Some(Node::Chunk { ns, key: k }));
        assert_eq!(t.get(ROOT_INO), Some(Node::Root));
        assert_eq!(t.get(9999), None);
    }
}
