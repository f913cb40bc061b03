//! The maintenance pass: the one walk over every chunk file, run off the request path.
//!
//! It makes the index ([`super::index`]) agree with the files, which stay the truth: every
//! chunk file gets a row (a file committed by an engine's loader straight into the cache, or
//! one whose row a crash lost), every row whose file is gone is dropped (removed by hand, or
//! evicted by a process that died before its transaction), and a namespace directory that is
//! gone loses its rows. It also removes the temporary files of dead writers (`.tmp-*`), which
//! open used to do by walking the whole cache.
//!
//! A pass runs on a background thread when a store opens an index that is new, was rebuilt
//! after damage, or was last checked more than [`MAINTENANCE_PERIOD`] ago, in one process at
//! a time (a claim in the index's `meta` table names the pid; a dead claimant's claim is
//! taken over). `gc` and `verify` run one synchronously. Reads never wait for it. The walk goes
//! one fan-out directory (`<ns>/<xx>/`) at a time, one transaction each, so its memory is one
//! directory's listing and a kill loses at most one directory's work. A store that is dropped
//! stops its pass between two directories (the `stop` flag) and waits for it, so no thread
//! keeps the index open after the store is gone; the stopped pass gives up its claim and the
//! next open runs it again.

use super::StoreError;
use super::disk::{fan_dirs, list_namespace_dirs, now_nanos, scan_fan};
use super::index::{
    self, META_COMPLETE, META_MAINTAINED, META_MAINTAINER, META_MAINTAINER_SINCE, meta,
    namespace_id, set_meta, upsert_chunk,
};
use kvfs_loader::ChunkKey;
use kvfs_loader::dir::{Layout, process_alive, sweep_temporaries};
use rusqlite::{Connection, TransactionBehavior, params};
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A complete index is re-checked against the files this often.
pub(crate) const MAINTENANCE_PERIOD: Duration = Duration::from_secs(3600);
/// Temporary files older than this are removed even if their writer may be alive.
pub(crate) const STALE_TMP_AGE: Duration = Duration::from_secs(3600);

fn db_err(path: &Path, e: rusqlite::Error) -> StoreError {
    StoreError::io(path, io::Error::other(e))
}

/// Whether a pass is due: the index was never completed, or was last checked over
/// [`MAINTENANCE_PERIOD`] ago, and nobody alive runs one.
fn due(conn: &Connection, now: i64) -> rusqlite::Result<bool> {
    let complete = meta(conn, META_COMPLETE)? == Some(1);
    let maintained = meta(conn, META_MAINTAINED)?.unwrap_or(0);
    let period = MAINTENANCE_PERIOD.as_nanos() as i64;
    if complete && now.saturating_sub(maintained) <= period {
        return Ok(false);
    }
    let holder = meta(conn, META_MAINTAINER)?.unwrap_or(0);
    let since = meta(conn, META_MAINTAINER_SINCE)?.unwrap_or(0);
    let held = holder > 0 && process_alive(holder as i32) && now.saturating_sub(since) < period;
    Ok(!held)
}

/// Claims the next pass for this process if one is due and nobody alive runs one. The
/// common case (not due) is one read, no write lock.
pub(crate) fn claim(conn: &Connection) -> rusqlite::Result<bool> {
    let now = now_nanos() as i64;
    if !due(conn, now)? {
        return Ok(false);
    }
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    if !due(&tx, now)? {
        return Ok(false); // another process claimed it meanwhile
    }
    set_meta(&tx, META_MAINTAINER, i64::from(std::process::id()))?;
    set_meta(&tx, META_MAINTAINER_SINCE, now)?;
    tx.commit()?;
    Ok(true)
}

/// The keys of namespace `ns_id`'s rows in fan-out range `fan` (keys starting with that byte).
fn keys_in_fan(conn: &Connection, ns_id: i64, fan: u8) -> rusqlite::Result<Vec<Vec<u8>>> {
    let lo = [fan];
    if fan == 255 {
        conn.prepare_cached("SELECT key FROM chunks WHERE ns = ?1 AND key >= ?2")?
            .query_map(params![ns_id, &lo[..]], |r| r.get(0))?
            .collect()
    } else {
        let hi = [fan + 1];
        conn.prepare_cached("SELECT key FROM chunks WHERE ns = ?1 AND key >= ?2 AND key < ?3")?
            .query_map(params![ns_id, &lo[..], &hi[..]], |r| r.get(0))?
            .collect()
    }
}

/// What a pass found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PassReport {
    pub files: u64,
    pub dropped_rows: u64,
    pub swept_temporaries: usize,
}

/// Runs one pass over the cache at `root` on its own connection (see the module docs).
pub(crate) fn run_pass(root: &Path, stop: &AtomicBool) -> Result<PassReport, StoreError> {
    let path = root.join(index::INDEX_FILE);
    let mut report = PassReport {
        swept_temporaries: sweep_temporaries(root, STALE_TMP_AGE)
            .map_err(|e| StoreError::io(root, e))?,
        ..PassReport::default()
    };
    if report.swept_temporaries > 0 {
        tracing::info!(root = %root.display(), swept = report.swept_temporaries, "removed temporary files of interrupted writers");
    }
    let conn = index::connect(root, &path).map_err(|e| db_err(&path, e))?;
    let dirs = list_namespace_dirs(root).map_err(|e| StoreError::io(root, e))?;
    for ns in &dirs {
        if !resync_namespace(&conn, root, ns, &mut report, stop)? {
            // Stopped (the store is being dropped): leave the index incomplete and give the
            // claim up, so the next open runs the pass again.
            if meta(&conn, META_MAINTAINER).map_err(|e| db_err(&path, e))?
                == Some(i64::from(std::process::id()))
            {
                set_meta(&conn, META_MAINTAINER, 0).map_err(|e| db_err(&path, e))?;
            }
            tracing::debug!(root = %root.display(), "chunk index maintenance pass stopped");
            return Ok(report);
        }
    }
    // Namespaces whose directory is gone: their rows go (the namespace row stays, at zero).
    let r = (|| {
        let known: Vec<(i64, String)> = conn
            .prepare("SELECT id, name FROM namespaces WHERE chunks > 0")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        for (id, name) in known {
            if !dirs.contains(&name) && !root.join(&name).is_dir() {
                report.dropped_rows +=
                    conn.execute("DELETE FROM chunks WHERE ns = ?1", [id])? as u64;
            }
        }
        set_meta(&conn, META_COMPLETE, 1)?;
        set_meta(&conn, META_MAINTAINED, now_nanos() as i64)?;
        if meta(&conn, META_MAINTAINER)? == Some(i64::from(std::process::id())) {
            set_meta(&conn, META_MAINTAINER, 0)?;
        }
        Ok(())
    })();
    r.map_err(|e| db_err(&path, e))?;
    tracing::debug!(root = %root.display(), ?report, "chunk index maintenance pass done");
    Ok(report)
}

/// Makes the rows of namespace `ns` agree with its files, one fan-out directory per
/// transaction. Every one of the 256 key ranges is checked, so rows of a fan-out directory
/// that is gone are dropped too. Returns false when `stop` was set before it finished.
fn resync_namespace(
    conn: &Connection,
    root: &Path,
    ns: &str,
    report: &mut PassReport,
    stop: &AtomicBool,
) -> Result<bool, StoreError> {
    let path = root.join(index::INDEX_FILE);
    let present: HashSet<String> = fan_dirs(root, ns)
        .map_err(|e| StoreError::io(&root.join(ns), e))?
        .into_iter()
        .collect();
    let ns_id = namespace_id(conn, ns).map_err(|e| db_err(&path, e))?;
    for fan in 0..=255u8 {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let fan_name = format!("{fan:02x}");
        let found = if present.contains(&fan_name) {
            scan_fan(root, ns, &fan_name).map_err(|e| StoreError::io(&root.join(ns), e))?
        } else {
            Vec::new()
        };
        report.files += found.len() as u64;
        let r = (|| {
            // Files without a row get the priority their importance implies: their headers
            // are read here, before the write transaction, not while holding it.
            let indexed: HashSet<Vec<u8>> = keys_in_fan(conn, ns_id, fan)?.into_iter().collect();
            let priorities: HashMap<ChunkKey, u8> = found
                .iter()
                .filter(|(key, ..)| !indexed.contains(&key.0[..]))
                .map(|(key, ..)| (*key, index::derived_priority(root, ns, key)))
                .collect();
            let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
            for (key, len, recency) in &found {
                upsert_chunk(&tx, ns_id, key, *len, *recency, || {
                    priorities
                        .get(key)
                        .copied()
                        .unwrap_or_else(|| index::derived_priority(root, ns, key))
                })?;
            }
            // Rows of this key range without a file found by the scan: re-checked one by one
            // (a put may have linked its file after the scan), dropped if still missing.
            let on_disk: HashSet<ChunkKey> = found.iter().map(|f| f.0).collect();
            for k in keys_in_fan(&tx, ns_id, fan)? {
                let Ok(k) = <[u8; 32]>::try_from(k.as_slice()) else {
                    continue;
                };
                let key = ChunkKey(k);
                if on_disk.contains(&key) || Layout::Cache.chunk_path(root, ns, &key).is_file() {
                    continue;
                }
                report.dropped_rows += tx
                    .prepare_cached("DELETE FROM chunks WHERE ns = ?1 AND key = ?2")?
                    .execute(params![ns_id, &k[..]])? as u64;
            }
            tx.commit()
        })();
        r.map_err(|e| db_err(&path, e))?;
    }
    Ok(true)
}
