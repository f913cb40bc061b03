//! A namespace directory listed a page at a time, so `ls` or `find` over a mount of a
//! million chunks starts at once and the daemon holds one page, not the whole listing.
//!
//! A page is the chunks whose key starts with one byte (the disk tier's fan-out directory
//! `<ns>/<xx>/`, about 1/256 of the namespace), in key order, fetched from the backend with
//! [`ChunkBackend::chunk_page`]. A READDIR cookie names a position as `(page + 1) << 32 |
//! (index in page + 1)`, with 1 and 2 for `.` and `..`, so the kernel can resume anywhere and
//! cookies only grow. The page being read is kept with the handle, so consecutive READDIRs
//! list its directory once. Entries added or removed during a listing may or may not be
//! seen (as POSIX allows); a resume from the last cookie this handle returned continues after
//! the last key it returned, so an eviction meanwhile cannot make it skip or repeat one.

use crate::backend::{BackendError, ChunkBackend};
use kvfs_loader::ChunkKey;
use std::sync::{Arc, Mutex};

/// Cookies of `.` and `..`.
const DOT: u64 = 1;
const DOTDOT: u64 = 2;
/// Pages (key first bytes).
const PAGES: u64 = 256;

/// One entry of a listing: its cookie (the READDIR offset after it) and what it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed {
    Dot,
    DotDot,
    Chunk(ChunkKey),
}

fn cookie(page: u64, index: usize) -> u64 {
    ((page + 1) << 32) | (index as u64 + 1)
}

/// Where a READDIR at `offset` starts: page and index in it.
fn position(offset: u64) -> (u64, usize) {
    if offset <= DOTDOT {
        (0, 0)
    } else {
        ((offset >> 32) - 1, (offset & 0xffff_ffff) as usize)
    }
}

#[derive(Default)]
struct Cursor {
    /// The page last listed, and its keys.
    page: Option<(u64, Arc<Vec<ChunkKey>>)>,
    /// The last cookie returned and the key it named.
    last: Option<(u64, ChunkKey)>,
}

/// The listing state of one open namespace directory.
pub struct ChunkListing {
    ns: Arc<str>,
    cursor: Mutex<Cursor>,
}

impl ChunkListing {
    pub fn new(ns: Arc<str>) -> ChunkListing {
        ChunkListing {
            ns,
            cursor: Mutex::new(Cursor::default()),
        }
    }

    pub fn namespace(&self) -> &Arc<str> {
        &self.ns
    }

    fn page(
        &self,
        backend: &dyn ChunkBackend,
        cur: &mut Cursor,
        page: u64,
    ) -> Result<Arc<Vec<ChunkKey>>, BackendError> {
        if let Some((p, keys)) = &cur.page
            && *p == page
        {
            return Ok(keys.clone());
        }
        let keys = Arc::new(backend.chunk_page(&self.ns, page as u8)?);
        cur.page = Some((page, keys.clone()));
        Ok(keys)
    }

    /// The entries after cookie `offset`: `.` and `..` when they are due, then the rest of
    /// the next page that has any; empty only at the end of the directory.
    pub fn after(
        &self,
        backend: &dyn ChunkBackend,
        offset: u64,
    ) -> Result<Vec<(u64, Listed)>, BackendError> {
        let mut cur = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        if offset < DOT {
            out.push((DOT, Listed::Dot));
        }
        if offset < DOTDOT {
            out.push((DOTDOT, Listed::DotDot));
        }
        let dots = out.len();
        let (mut page, mut skip) = position(offset);
        let resume_after = cur.last.filter(|(c, _)| *c == offset).map(|(_, k)| k);
        while page < PAGES {
            let keys = self.page(backend, &mut cur, page)?;
            let start = match resume_after {
                // Continue after the key last returned, wherever it is now.
                Some(k) if skip > 0 => keys.partition_point(|x| *x <= k),
                _ => skip.min(keys.len()),
            };
            out.extend(
                keys.iter()
                    .enumerate()
                    .skip(start)
                    .map(|(i, k)| (cookie(page, i), Listed::Chunk(*k))),
            );
            if out.len() > dots {
                break;
            }
            page += 1;
            skip = 0;
        }
        if let Some((c, Listed::Chunk(k))) = out.last() {
            cur.last = Some((*c, *k));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemBackend;
    use kvfs_loader::{ModelSpec, SaltTag, synth_chunk};

    fn ns() -> String {
        ModelSpec::preset("tiny").unwrap().namespace_dir()
    }

    fn backend_with(n: usize) -> (MemBackend, Vec<ChunkKey>) {
        let spec = ModelSpec::preset("tiny").unwrap();
        let b = MemBackend::new(&std::env::temp_dir(), u64::MAX);
        let mut keys = Vec::new();
        for i in 0..n {
            let (m, bytes) = synth_chunk(&spec, None, SaltTag::NONE, vec![i as u32; 4]).unwrap();
            b.insert(&ns(), m.key, bytes);
            keys.push(m.key);
        }
        keys.sort();
        (b, keys)
    }

    /// Reads a whole listing the way the kernel does: each call from the last cookie.
    fn read_all(l: &ChunkListing, b: &MemBackend) -> Vec<Listed> {
        let mut off = 0;
        let mut out = Vec::new();
        loop {
            let batch = l.after(b, off).unwrap();
            let Some((last, _)) = batch.last() else { break };
            assert!(*last > off, "cookies grow");
            off = *last;
            out.extend(batch.into_iter().map(|e| e.1));
        }
        out
    }

    #[test]
    fn lists_every_chunk_once_in_key_order_a_page_at_a_time() {
        let (b, keys) = backend_with(600);
        let l = ChunkListing::new(Arc::from(ns().as_str()));
        let first = l.after(&b, 0).unwrap();
        assert!(
            first.len() < 50,
            "one page, not the whole namespace: {}",
            first.len()
        );
        let all = read_all(&l, &b);
        assert_eq!(all[..2], [Listed::Dot, Listed::DotDot]);
        let listed: Vec<ChunkKey> = all[2..]
            .iter()
            .map(|e| match e {
                Listed::Chunk(k) => *k,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(listed, keys);
    }

    #[test]
    fn an_eviction_during_a_listing_skips_and_repeats_nothing_else() {
        let (b, keys) = backend_with(40);
        let l = ChunkListing::new(Arc::from(ns().as_str()));
        // Read up to the first chunk, then remove it (the one just returned) and one not
        // yet returned: the listing goes on after the first and never shows the second.
        let first = l.after(&b, 0).unwrap();
        let (c, Listed::Chunk(k)) = first[2].clone() else {
            panic!()
        };
        let gone_later = *keys.last().unwrap();
        assert!(b.remove(&ns(), &k).unwrap());
        assert!(b.remove(&ns(), &gone_later).unwrap());
        let mut off = c;
        let mut rest = Vec::new();
        loop {
            let batch = l.after(&b, off).unwrap();
            let Some((last, _)) = batch.last() else { break };
            off = *last;
            rest.extend(batch.into_iter().filter_map(|e| match e.1 {
                Listed::Chunk(k) => Some(k),
                _ => None,
            }));
        }
        let expected: Vec<ChunkKey> = keys
            .iter()
            .copied()
            .filter(|x| *x > k && *x != gone_later)
            .collect();
        assert_eq!(rest, expected);
    }

    #[test]
    fn an_empty_namespace_lists_dot_and_dotdot_then_ends() {
        let (b, _) = backend_with(0);
        b.create_namespace(&ns()).unwrap();
        let l = ChunkListing::new(Arc::from(ns().as_str()));
        assert_eq!(read_all(&l, &b), [Listed::Dot, Listed::DotDot]);
    }
}
