//! The disk tier's persistent index: one SQLite database beside the chunks,
//! `<root>/.kvfs-index.sqlite`, shared by every process that opens the cache.
//!
//! ## Why a database, and what it holds
//! Opening a store used to rescan every chunk file (about 5 us a chunk: seconds per command at
//! a million chunks) to learn what capacity accounting and eviction need. This index keeps
//! exactly that, per chunk: length, last use, priority; per namespace: chunk count and bytes
//! (kept by triggers, so "how much is used" is a sum over namespaces, not over chunks); and
//! the space reserved by puts in flight, in any process. A B-tree on `(priority, last_use)`
//! gives the next eviction victim in `O(log n)`. Every change is a transaction (WAL journal),
//! so a crash or a kill leaves the last committed state, and `BEGIN IMMEDIATE` serialises
//! the read-plan-write of a reservation across processes: two processes sharing a root see
//! one usage figure and cannot overshoot the capacity together.
//!
//! ## The file system stays the truth
//! Reads never need the index (a chunk's path is derived from its key). The index is a cache
//! of the files: a row without a file is dropped when it is noticed (a read miss, the next
//! maintenance pass), a file without a row is adopted when it is noticed (a read, a `stat`, a
//! pass). A missing, truncated or corrupt index is set aside and rebuilt by a maintenance pass
//! on a background thread ([`super::maintenance`]), during which reads work as always and
//! puts are accounted from what the pass has found so far.
//!
//! ## Recency
//! A read's "last use" is buffered in memory and written in one transaction per
//! [`TOUCH_FLUSH_ENTRIES`] reads or [`TOUCH_FLUSH_AGE`], and always before an eviction is
//! planned, so the read path costs no write; a crash loses at most that much recency.
//!
//! ## Crash recovery of puts
//! A put reserves its bytes in a row that names its pid and its chunk; the chunk's row and
//! the reservation's removal are one transaction after the file is linked. At open, the
//! reservations of dead processes (or older than [`STALE_RESERVATION`]) are resolved: the
//! chunk is indexed if its file was linked, and the reservation dropped.

use super::StoreError;
use super::disk::{DiskEntry, Victim, now_nanos};
use kvfs_loader::ChunkKey;
use kvfs_loader::dir::{file_mode_in, process_alive};
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};
use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::ops::ControlFlow;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The index file under the cache root (a dot file: not a namespace, never listed).
pub const INDEX_FILE: &str = ".kvfs-index.sqlite";
/// Bump when the schema changes incompatibly: an index of another version is rebuilt.
const SCHEMA_VERSION: i64 = 1;
/// Buffered read recencies are written after this many reads...
pub(crate) const TOUCH_FLUSH_ENTRIES: usize = 1024;
/// ...or this long after the first unwritten one.
pub(crate) const TOUCH_FLUSH_AGE: Duration = Duration::from_secs(1);
/// How long a process waits for another's write transaction before it reports an error.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// A reservation this old is dropped even if its pid is alive (the pid was reused).
const STALE_RESERVATION: Duration = Duration::from_secs(3600);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS namespaces(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    chunks INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS chunks(
    ns INTEGER NOT NULL,
    key BLOB NOT NULL,
    len INTEGER NOT NULL,
    last_use INTEGER NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY(ns, key)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_eviction ON chunks(priority, last_use);
CREATE TABLE IF NOT EXISTS reservations(
    id INTEGER PRIMARY KEY,
    pid INTEGER NOT NULL,
    since INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    ns INTEGER,
    key BLOB);
CREATE TRIGGER IF NOT EXISTS chunks_added AFTER INSERT ON chunks BEGIN
    UPDATE namespaces SET chunks = chunks + 1, bytes = bytes + new.len WHERE id = new.ns;
END;
CREATE TRIGGER IF NOT EXISTS chunks_removed AFTER DELETE ON chunks BEGIN
    UPDATE namespaces SET chunks = chunks - 1, bytes = bytes - old.len WHERE id = old.ns;
END;
CREATE TRIGGER IF NOT EXISTS chunks_resized AFTER UPDATE OF len ON chunks BEGIN
    UPDATE namespaces SET bytes = bytes - old.len + new.len WHERE id = new.ns;
END;
";

/// `meta` names.
const META_SCHEMA: &str = "schema";
/// 1 once a maintenance pass has indexed every file since the index was created.
pub(crate) const META_COMPLETE: &str = "complete";
/// Pid of the process running a maintenance pass, and when it started (ns).
pub(crate) const META_MAINTAINER: &str = "maintainer";
pub(crate) const META_MAINTAINER_SINCE: &str = "maintainer_since";
/// When the last maintenance pass finished (ns since the epoch).
pub(crate) const META_MAINTAINED: &str = "maintained";

fn index_err(path: &Path, e: rusqlite::Error) -> StoreError {
    StoreError::io(path, io::Error::other(e))
}

/// Whether an SQLite error says the file is damaged (as opposed to busy, full, ...).
fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
    )
}

/// Whether an SQLite error says the index cannot be written here (as opposed to damaged).
fn is_unwritable(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::ReadOnly | ErrorCode::CannotOpen | ErrorCode::PermissionDenied)
    )
}

/// Whether the file at `path` is shorter than its own header says (a truncated copy or a
/// torn write): SQLite would only notice when a query reaches a missing page.
fn looks_truncated(path: &Path) -> io::Result<bool> {
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(false);
    }
    let mut h = [0u8; 100];
    if len < 100 {
        return Ok(true);
    }
    f.read_exact(&mut h)?;
    if &h[..16] != b"SQLite format 3\0" {
        return Ok(true);
    }
    let page_size = match u16::from_be_bytes([h[16], h[17]]) {
        1 => 65536,
        n => u64::from(n),
    };
    let be32 = |o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    // The page count is valid when "version-valid-for" equals the change counter.
    let pages = u64::from(be32(28));
    let count_valid = be32(92) == be32(24) && pages > 0;
    Ok(count_valid && pages * page_size > len)
}

/// Moves a damaged index aside (kept once, for inspection) with its journal files.
fn set_aside(path: &Path) {
    let aside = path.with_extension("sqlite.damaged");
    match fs::rename(path, &aside) {
        Ok(()) => tracing::warn!(
            path = %path.display(),
            moved_to = %aside.display(),
            "the chunk index is damaged: set aside, rebuilding it in the background"
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot set aside the damaged chunk index")
        }
    }
    for suffix in ["-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = fs::remove_file(PathBuf::from(p));
    }
}

/// Device and inode of a file: which file an open connection is on.
fn file_ident(path: &Path) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Opens (creating with the cache's file mode) the index at `path` and makes sure its
/// schema exists. An index of another schema version is emptied (it is rebuilt).
pub(crate) fn connect(root: &Path, path: &Path) -> rusqlite::Result<Connection> {
    // SQLite would create the file with the process umask; the cache's files copy their bits
    // from the root (chunk headers hold prompts), and SQLite gives its -wal and -shm files
    // the mode of the database file.
    let _ = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(file_mode_in(root))
        .open(path);
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL: readers never wait for the writer; NORMAL: a commit is durable at the next
    // checkpoint, atomic always (a crash loses recent rows, never consistency; the next
    // maintenance pass finds their files).
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(SCHEMA)?;
    let version: Option<i64> = conn
        .query_row(
            "SELECT value FROM meta WHERE name = ?1",
            [META_SCHEMA],
            |r| r.get(0),
        )
        .optional()?;
    match version {
        Some(SCHEMA_VERSION) => {}
        None => {
            conn.execute(
                "INSERT OR IGNORE INTO meta(name, value) VALUES (?1, ?2)",
                params![META_SCHEMA, SCHEMA_VERSION],
            )?;
        }
        Some(other) => {
            tracing::warn!(
                found = other,
                expected = SCHEMA_VERSION,
                "chunk index of another version: rebuilding it"
            );
            conn.execute_batch(
                "BEGIN IMMEDIATE; DELETE FROM chunks; DELETE FROM reservations;
                 UPDATE namespaces SET chunks = 0, bytes = 0; DELETE FROM meta;
                 COMMIT;",
            )?;
            conn.execute(
                "INSERT INTO meta(name, value) VALUES (?1, ?2)",
                params![META_SCHEMA, SCHEMA_VERSION],
            )?;
        }
    }
    Ok(conn)
}

/// Reads a `meta` value.
pub(crate) fn meta(conn: &Connection, name: &str) -> rusqlite::Result<Option<i64>> {
    conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
        r.get(0)
    })
    .optional()
}

/// Writes a `meta` value.
pub(crate) fn set_meta(conn: &Connection, name: &str, value: i64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta(name, value) VALUES (?1, ?2)
         ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        params![name, value],
    )
    .map(|_| ())
}

/// The id of namespace `name`, created when missing. Namespace rows are never deleted, so an
/// id another process cached stays valid.
pub(crate) fn namespace_id(conn: &Connection, name: &str) -> rusqlite::Result<i64> {
    if let Some(id) = conn
        .query_row("SELECT id FROM namespaces WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?
    {
        return Ok(id);
    }
    conn.execute("INSERT OR IGNORE INTO namespaces(name) VALUES (?1)", [name])?;
    conn.query_row("SELECT id FROM namespaces WHERE name = ?1", [name], |r| {
        r.get(0)
    })
}

/// Inserts a chunk row, or refreshes its length and (only forward) its last use. A new row's
/// priority is `priority()` (the one its importance implies: [`super::priority`]); an existing
/// row keeps its own, so an explicit `set_priority` wins.
pub(crate) fn upsert_chunk(
    conn: &Connection,
    ns: i64,
    key: &ChunkKey,
    len: u64,
    last_use: u64,
    priority: impl FnOnce() -> u8,
) -> rusqlite::Result<()> {
    let known: Option<i64> = conn
        .prepare_cached("SELECT 1 FROM chunks WHERE ns = ?1 AND key = ?2")?
        .query_row(params![ns, &key.0[..]], |r| r.get(0))
        .optional()?;
    let priority = if known.is_some() { 0 } else { priority() };
    conn.prepare_cached(
        "INSERT INTO chunks(ns, key, len, last_use, priority) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(ns, key) DO UPDATE SET len = excluded.len,
             last_use = max(last_use, excluded.last_use)
         WHERE len != excluded.len OR last_use < excluded.last_use",
    )?
    .execute(params![
        ns,
        &key.0[..],
        len as i64,
        last_use as i64,
        i64::from(priority)
    ])
    .map(|_| ())
}

/// The priority a new row of chunk `key` in namespace `ns` under `root` gets.
pub(crate) fn derived_priority(root: &Path, ns: &str, key: &ChunkKey) -> u8 {
    super::priority::of_chunk_file(&kvfs_loader::dir::Layout::Cache.chunk_path(root, ns, key))
}

/// The open connection and what this process keeps beside it.
struct State {
    conn: Connection,
    /// Device and inode of the file `conn` is on.
    ident: Option<(u64, u64)>,
    ns_ids: HashMap<String, i64>,
    /// Buffered read recencies (see the module docs).
    touches: HashMap<(String, ChunkKey), u64>,
    first_touch: Option<Instant>,
}

impl State {
    fn ns_id(&mut self, name: &str) -> rusqlite::Result<i64> {
        if let Some(id) = self.ns_ids.get(name) {
            return Ok(*id);
        }
        let id = namespace_id(&self.conn, name)?;
        self.ns_ids.insert(name.to_string(), id);
        Ok(id)
    }

    /// The id of `name` if the namespace has a row (no write).
    fn known_ns_id(&mut self, name: &str) -> rusqlite::Result<Option<i64>> {
        if let Some(id) = self.ns_ids.get(name) {
            return Ok(Some(*id));
        }
        let id: Option<i64> = self
            .conn
            .query_row("SELECT id FROM namespaces WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        if let Some(id) = id {
            self.ns_ids.insert(name.to_string(), id);
        }
        Ok(id)
    }

    fn flush_touches(&mut self) -> rusqlite::Result<()> {
        if self.touches.is_empty() {
            return Ok(());
        }
        let touches = std::mem::take(&mut self.touches);
        self.first_touch = None;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut find = tx.prepare_cached("SELECT id FROM namespaces WHERE name = ?1")?;
            let mut update = tx.prepare_cached(
                "UPDATE chunks SET last_use = ?3 WHERE ns = ?1 AND key = ?2 AND last_use < ?3",
            )?;
            for ((ns, key), at) in &touches {
                let id: Option<i64> = find.query_row([ns], |r| r.get(0)).optional()?;
                if let Some(id) = id {
                    update.execute(params![id, &key.0[..], *at as i64])?;
                }
            }
        }
        tx.commit()
    }
}

/// The operations a write transaction offers the eviction planner ([`ChunkIndex::write`]).
pub(crate) struct Tx<'a> {
    tx: rusqlite::Transaction<'a>,
    ns_ids: &'a mut HashMap<String, i64>,
}

impl Tx<'_> {
    fn ns_id(&mut self, name: &str) -> rusqlite::Result<i64> {
        if let Some(id) = self.ns_ids.get(name) {
            return Ok(*id);
        }
        let id = namespace_id(&self.tx, name)?;
        self.ns_ids.insert(name.to_string(), id);
        Ok(id)
    }

    /// Bytes of every indexed chunk.
    pub fn used(&self) -> rusqlite::Result<u64> {
        used(&self.tx)
    }

    /// Bytes reserved by puts in flight, in every process.
    pub fn reserved(&self) -> rusqlite::Result<u64> {
        self.tx
            .query_row(
                "SELECT COALESCE(SUM(bytes), 0) FROM reservations",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map(|v| v.max(0) as u64)
    }

    /// Visits chunks coldest first (lowest priority, then least recently used) until `f`
    /// breaks: one B-tree walk, whatever the number of chunks.
    pub fn coldest(&self, mut f: impl FnMut(Victim) -> ControlFlow<()>) -> rusqlite::Result<()> {
        let mut stmt = self.tx.prepare_cached(
            "SELECT n.name, c.key, c.len FROM chunks c INDEXED BY chunks_by_eviction
             JOIN namespaces n ON n.id = c.ns ORDER BY c.priority, c.last_use",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let ns: String = r.get(0)?;
            let key: Vec<u8> = r.get(1)?;
            let len: i64 = r.get(2)?;
            let Ok(key) = <[u8; 32]>::try_from(key.as_slice()) else {
                continue;
            };
            let v = Victim {
                ns,
                key: ChunkKey(key),
                len: len.max(0) as u64,
            };
            if f(v).is_break() {
                break;
            }
        }
        Ok(())
    }

    /// Drops a chunk's row.
    pub fn remove(&mut self, ns: &str, key: &ChunkKey) -> rusqlite::Result<()> {
        let id = self.ns_id(ns)?;
        self.tx
            .prepare_cached("DELETE FROM chunks WHERE ns = ?1 AND key = ?2")?
            .execute(params![id, &key.0[..]])
            .map(|_| ())
    }

    /// Holds `bytes` for a put of `key` in `ns` by this process; returns the reservation id.
    pub fn reserve(
        &mut self,
        bytes: u64,
        chunk: Option<(&str, &ChunkKey)>,
    ) -> rusqlite::Result<i64> {
        let (ns, key) = match chunk {
            Some((ns, key)) => (Some(self.ns_id(ns)?), Some(key.0.to_vec())),
            None => (None, None),
        };
        self.tx.execute(
            "INSERT INTO reservations(pid, since, bytes, ns, key) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                std::process::id(),
                now_nanos() as i64,
                bytes as i64,
                ns,
                key
            ],
        )?;
        Ok(self.tx.last_insert_rowid())
    }
}

fn used(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row("SELECT COALESCE(SUM(bytes), 0) FROM namespaces", [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|v| v.max(0) as u64)
}

/// A reservation as stored: id, pid, since (ns), namespace name, key.
type ReservationRow = (i64, i64, i64, Option<String>, Option<Vec<u8>>);

/// This process's handle on the index (see the module docs).
pub(crate) struct ChunkIndex {
    root: PathBuf,
    path: PathBuf,
    state: Mutex<State>,
}

impl std::fmt::Debug for ChunkIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkIndex")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ChunkIndex {
    /// Opens the index of the cache at `root`, setting aside a damaged one, and resolves the
    /// reservations of dead processes. Costs the same whatever the number of chunks.
    pub fn open(root: &Path) -> Result<ChunkIndex, StoreError> {
        let path = root.join(INDEX_FILE);
        if looks_truncated(&path).map_err(|e| StoreError::io(&path, e))? {
            set_aside(&path);
        }
        let conn = match connect(root, &path).and_then(|c| probe(&c).map(|()| c)) {
            Ok(c) => c,
            Err(e) if is_damage(&e) => {
                set_aside(&path);
                connect(root, &path).map_err(|e| index_err(&path, e))?
            }
            // A cache this process may read but not write (a read-only file system, a
            // directory of another user): reads need no index, so they go on with a private
            // one in memory, as every process had before the index was shared.
            Err(e) if is_unwritable(&e) => {
                tracing::warn!(path = %path.display(), error = %e,
                    "cannot open the chunk index for writing: using a private one in memory");
                let c = Connection::open_in_memory().map_err(|e| index_err(&path, e))?;
                c.execute_batch(SCHEMA).map_err(|e| index_err(&path, e))?;
                c
            }
            Err(e) => return Err(index_err(&path, e)),
        };
        let index = ChunkIndex {
            root: root.to_path_buf(),
            path: path.clone(),
            state: Mutex::new(State {
                conn,
                ident: file_ident(&path),
                ns_ids: HashMap::new(),
                touches: HashMap::new(),
                first_touch: None,
            }),
        };
        index.resolve_dead_reservations();
        Ok(index)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update is one SQLite transaction: a panic cannot leave `State` half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the connection; a damaged index is set aside, recreated empty (a
    /// maintenance pass rebuilds it) and `f` retried once.
    fn with<T>(
        &self,
        what: &str,
        mut f: impl FnMut(&mut State) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut st = self.state();
        match f(&mut st) {
            Ok(v) => Ok(v),
            Err(e) if is_damage(&e) => {
                tracing::warn!(error = %e, what, "chunk index damaged");
                self.recover(&mut st)?;
                f(&mut st).map_err(|e| index_err(&self.path, e))
            }
            Err(e) => Err(index_err(&self.path, e)),
        }
    }

    /// Like [`ChunkIndex::with`] for bookkeeping a caller cannot act on (a read's
    /// recency, adopting a file): a failure is logged, never returned.
    fn quietly(&self, what: &str, f: impl FnMut(&mut State) -> rusqlite::Result<()>) {
        if let Err(e) = self.with(what, f) {
            tracing::warn!(error = %e, what, "chunk index not updated");
        }
    }

    fn recover(&self, st: &mut State) -> Result<(), StoreError> {
        // Another process may have set it aside and made a new one already: only the file
        // this connection is on is moved.
        if file_ident(&self.path) == st.ident {
            set_aside(&self.path);
        }
        st.conn = connect(&self.root, &self.path).map_err(|e| index_err(&self.path, e))?;
        st.ident = file_ident(&self.path);
        st.ns_ids.clear();
        Ok(())
    }

    /// Reservations of processes that died mid-put: the chunk is indexed if its file was
    /// linked, then the reservation is dropped.
    fn resolve_dead_reservations(&self) {
        let root = self.root.clone();
        let me = std::process::id() as i64;
        self.quietly("resolving reservations of dead writers", |st| {
            let rows: Vec<ReservationRow> = {
                let mut stmt = st.conn.prepare(
                    "SELECT r.id, r.pid, r.since, n.name, r.key FROM reservations r
                     LEFT JOIN namespaces n ON n.id = r.ns",
                )?;
                stmt.query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<Result<_, _>>()?
            };
            let now = now_nanos() as i64;
            for (id, pid, since, ns, key) in rows {
                let stale = now.saturating_sub(since) > STALE_RESERVATION.as_nanos() as i64;
                let dead = pid != me && !process_alive(pid as i32);
                if !(stale || dead) {
                    continue;
                }
                let tx = st
                    .conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)?;
                if let (Some(ns), Some(key)) = (ns, key)
                    && let Ok(key) = <[u8; 32]>::try_from(key.as_slice())
                {
                    let key = ChunkKey(key);
                    let p = kvfs_loader::dir::Layout::Cache.chunk_path(&root, &ns, &key);
                    if let Ok(md) = fs::metadata(&p)
                        && md.is_file()
                    {
                        let ns_id = namespace_id(&tx, &ns)?;
                        let recency = super::disk::file_recency(&md);
                        upsert_chunk(&tx, ns_id, &key, md.len(), recency, || {
                            super::priority::of_chunk_file(&p)
                        })?;
                    }
                }
                tx.execute("DELETE FROM reservations WHERE id = ?1", [id])?;
                tx.commit()?;
            }
            Ok(())
        });
    }

    /// Claims the next maintenance pass for this process if one is due
    /// ([`super::maintenance::claim`]).
    pub fn claim_maintenance(&self) -> Result<bool, StoreError> {
        self.with("claiming the maintenance", |st| {
            super::maintenance::claim(&st.conn)
        })
    }

    /// The row of a chunk, if indexed.
    pub fn entry(&self, ns: &str, key: &ChunkKey) -> Option<DiskEntry> {
        self.with("reading a chunk's row", |st| {
            let Some(id) = st.known_ns_id(ns)? else {
                return Ok(None);
            };
            let e = st
                .conn
                .prepare_cached(
                    "SELECT len, last_use, priority FROM chunks WHERE ns = ?1 AND key = ?2",
                )?
                .query_row(params![id, &key.0[..]], |r| {
                    Ok(DiskEntry {
                        len: r.get::<_, i64>(0)?.max(0) as u64,
                        last_use: r.get::<_, i64>(1)?.max(0) as u64,
                        priority: r.get::<_, i64>(2)?.clamp(0, 255) as u8,
                    })
                })
                .optional()?;
            Ok(e)
        })
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "chunk index unreadable");
            None
        })
    }

    /// Indexes a chunk or refreshes its length and last use (priority kept).
    pub fn record(&self, ns: &str, key: &ChunkKey, len: u64, last_use: u64) {
        self.quietly("indexing a chunk", |st| {
            let id = st.ns_id(ns)?;
            upsert_chunk(&st.conn, id, key, len, last_use, || {
                derived_priority(&self.root, ns, key)
            })
        });
    }

    /// Indexes a chunk found on disk unless it is indexed already (no write then).
    pub fn adopt(&self, ns: &str, key: &ChunkKey, len: u64, recency: u64) {
        self.quietly("adopting a chunk", |st| {
            let id = st.ns_id(ns)?;
            let known: Option<i64> = st
                .conn
                .prepare_cached("SELECT len FROM chunks WHERE ns = ?1 AND key = ?2")?
                .query_row(params![id, &key.0[..]], |r| r.get(0))
                .optional()?;
            if known == Some(len as i64) {
                return Ok(());
            }
            upsert_chunk(&st.conn, id, key, len, recency, || {
                derived_priority(&self.root, ns, key)
            })
        });
    }

    /// Drops a chunk's row (its file is gone or going).
    pub fn forget(&self, ns: &str, key: &ChunkKey) {
        self.quietly("forgetting a chunk", |st| {
            st.touches.remove(&(ns.to_string(), *key));
            let Some(id) = st.known_ns_id(ns)? else {
                return Ok(());
            };
            st.conn
                .prepare_cached("DELETE FROM chunks WHERE ns = ?1 AND key = ?2")?
                .execute(params![id, &key.0[..]])
                .map(|_| ())
        });
    }

    /// Notes a read of a chunk (buffered; see the module docs).
    pub fn touch(&self, ns: &str, key: &ChunkKey) {
        let mut st = self.state();
        st.touches.insert((ns.to_string(), *key), now_nanos());
        let first = *st.first_touch.get_or_insert_with(Instant::now);
        if st.touches.len() >= TOUCH_FLUSH_ENTRIES || first.elapsed() >= TOUCH_FLUSH_AGE {
            drop(st);
            self.flush_touches();
        }
    }

    /// Writes buffered read recencies now.
    pub fn flush_touches(&self) {
        self.quietly("writing read recencies", State::flush_touches);
    }

    /// Sets a chunk's eviction priority (persisted). False when it is not indexed.
    pub fn set_priority(&self, ns: &str, key: &ChunkKey, priority: u8) -> Result<bool, StoreError> {
        self.with("setting a priority", |st| {
            let id = st.ns_id(ns)?;
            let n = st
                .conn
                .prepare_cached("UPDATE chunks SET priority = ?3 WHERE ns = ?1 AND key = ?2")?
                .execute(params![id, &key.0[..], i64::from(priority)])?;
            Ok(n > 0)
        })
    }

    /// Bytes of every indexed chunk.
    pub fn used(&self) -> u64 {
        self.with("reading the usage", |st| used(&st.conn))
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "chunk index unreadable");
                0
            })
    }

    /// Chunk count and bytes of every namespace that has a row.
    pub fn totals(&self) -> Result<HashMap<String, (u64, u64)>, StoreError> {
        self.with("reading namespace totals", |st| {
            let mut stmt = st
                .conn
                .prepare_cached("SELECT name, chunks, bytes FROM namespaces")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    (
                        r.get::<_, i64>(1)?.max(0) as u64,
                        r.get::<_, i64>(2)?.max(0) as u64,
                    ),
                ))
            })?;
            rows.collect()
        })
    }

    /// Runs `f` in one write transaction (`BEGIN IMMEDIATE`: no other process writes
    /// meanwhile), after writing buffered recencies so the eviction order is current. `f`'s
    /// error rolls the transaction back.
    pub fn write<T>(
        &self,
        mut f: impl FnMut(&mut Tx<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut outcome: Option<Result<T, StoreError>> = None;
        self.with("planning an eviction", |st| {
            st.flush_touches()?;
            let State { conn, ns_ids, .. } = st;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut t = Tx { tx, ns_ids };
            match f(&mut t) {
                Ok(v) => {
                    t.tx.commit()?;
                    outcome = Some(Ok(v));
                }
                Err(e) => outcome = Some(Err(e)),
            }
            Ok(())
        })?;
        outcome.expect("set by the closure")
    }

    /// Turns reservation `id` into the chunk's row, in one transaction: the bytes are never
    /// unaccounted. `priority` is a new row's ([`super::priority`]; an existing row keeps its
    /// own).
    pub fn commit_reservation(&self, id: i64, ns: &str, key: &ChunkKey, len: u64, priority: u8) {
        self.quietly("committing a reservation", |st| {
            let ns_id = st.ns_id(ns)?;
            let tx = st
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            upsert_chunk(&tx, ns_id, key, len, now_nanos(), || priority)?;
            tx.execute("DELETE FROM reservations WHERE id = ?1", [id])?;
            tx.commit()
        });
    }

    /// Drops reservation `id` (the put failed or is done).
    pub fn release(&self, id: i64) {
        self.quietly("releasing a reservation", |st| {
            st.conn
                .execute("DELETE FROM reservations WHERE id = ?1", [id])
                .map(|_| ())
        });
    }
}

/// A read that touches the tables: fails on a damaged file that opened fine.
fn probe(conn: &Connection) -> rusqlite::Result<()> {
    used(conn)?;
    conn.query_row("SELECT count(*) FROM reservations", [], |r| {
        r.get::<_, i64>(0)
    })?;
    Ok(())
}

impl Drop for ChunkIndex {
    fn drop(&mut self) {
        self.flush_touches();
    }
}
