//! Prefetching selective loads (ContiguousKV, issue 14): load only the important groups of a
//! cached prefix, layer by layer, with reads issued ahead of the engine's computation.
//!
//! A pruned re-prefill needs, per layer, only the groups its pruning keeps, and it needs
//! layer `l` only when it reaches layer `l`. ContiguousKV groups layers into **periods**
//! (runs of layers whose important groups are similar) and overlaps I/O with compute twice:
//! - **intra-period**: when the engine reaches a period's first layer, the reads of the
//!   period's other layers are issued, so they load while the first layer computes;
//! - **inter-period**: at the same moment the next period's first layer is issued, so it is
//!   in place (or nearly) when the engine gets there.
//!
//! [`PrefetchingLoad`] runs that schedule over ordinary selective loads
//! ([`Loader::load_request`] with a [`Selection`] restricted to the layers of one batch), so
//! it reads exactly the selected groups' extents (read amplification 1.0 at aligned group
//! sizes) and nothing here knows an engine: a caller asks [`PrefetchingLoad::wait_layer`] for
//! each layer in order, computes, and asks for the next. [`Prefetch::Off`] issues each layer
//! only when asked (the serial baseline the overlap is measured against); the time the caller
//! spent blocked is reported ([`PrefetchStats::blocked`]).
//!
//! Which groups: the importance stored in the chunk headers (format v2,
//! [`crate::importance`]), read without touching the payload by [`Loader::chunk_headers`], and
//! turned into a per-layer selection of the best share of the prefix's groups by
//! [`Loader::importance_selection`]. Each batch re-reads the headers of its chunks (4 KiB
//! each), a small cost next to the groups it reads.

use crate::error::FormatError;
use crate::format::{ChunkHeader, Verify};
use crate::identity::check_identity;
use crate::importance::{Importance, top_share};
use crate::loader::{Dest, LoadHandle, LoadRequest, LoadStats, Loader, LoaderError};
use crate::selective::Selection;
use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Errors of a pruned (importance-guided, prefetching) load.
#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    #[error("budget {0} is not a share in (0, 1]")]
    Budget(f64),
    #[error("chunk {chunk} ({}) has no importance section (written without one, or version 1)", path.display())]
    NoImportance { chunk: usize, path: PathBuf },
    #[error("chunk {chunk} ({}): {source}", path.display())]
    Header {
        chunk: usize,
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error("invalid periods: {0}")]
    Periods(String),
    #[error(transparent)]
    Loader(#[from] LoaderError),
}

/// How far ahead of the engine reads are issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prefetch {
    /// Each layer is read when the engine asks for it: no overlap.
    Off,
    /// Intra-period only: a period's other layers load while its first layer computes.
    IntraPeriod,
    /// Intra- and inter-period (ContiguousKV): also the next period's first layer.
    #[default]
    Full,
}

/// Consecutive runs of layers that share a prefetch step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Periods {
    ranges: Vec<Range<usize>>,
}

impl Periods {
    /// Periods of `len` layers (the last may be shorter).
    pub fn uniform(num_layers: usize, len: usize) -> Result<Periods, PrefetchError> {
        if num_layers == 0 || len == 0 {
            return Err(PrefetchError::Periods(format!(
                "{num_layers} layers in periods of {len}"
            )));
        }
        Ok(Periods {
            ranges: (0..num_layers)
                .step_by(len)
                .map(|s| s..(s + len).min(num_layers))
                .collect(),
        })
    }

    /// ContiguousKV's periods: a layer joins the current period while its selected groups
    /// overlap the period's first layer's by at least `min_overlap` (Jaccard index), and
    /// starts a new period otherwise.
    pub fn by_similarity(
        selection: &Selection,
        min_overlap: f64,
    ) -> Result<Periods, PrefetchError> {
        if selection.num_layers() == 0 {
            return Err(PrefetchError::Periods("no layers".into()));
        }
        let mut ranges: Vec<Range<usize>> = std::iter::once(0..1).collect();
        for layer in 1..selection.num_layers() {
            let cur = ranges.last_mut().unwrap();
            if jaccard(selection.groups(cur.start), selection.groups(layer)) >= min_overlap {
                cur.end = layer + 1;
            } else {
                ranges.push(layer..layer + 1);
            }
        }
        Ok(Periods { ranges })
    }

    pub fn ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }

    pub fn num_layers(&self) -> usize {
        self.ranges.last().map_or(0, |r| r.end)
    }

    /// The period holding `layer`.
    pub fn of(&self, layer: usize) -> usize {
        self.ranges.partition_point(|r| r.end <= layer)
    }
}

/// |a ∩ b| / |a ∪ b| of two sorted lists (1.0 for two empty lists).
fn jaccard(a: &[u32], b: &[u32]) -> f64 {
    let (mut i, mut j, mut both) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                both += 1;
                i += 1;
                j += 1;
            }
        }
    }
    let union = a.len() + b.len() - both;
    if union == 0 {
        1.0
    } else {
        both as f64 / union as f64
    }
}

/// Figures of a finished prefetching load.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefetchStats {
    /// Selective loads issued (one per batch of layers).
    pub batches: usize,
    pub bytes_read: u64,
    pub bytes_needed: u64,
    /// Time the caller spent blocked in [`PrefetchingLoad::wait_layer`]: the I/O that was
    /// not hidden behind its computation.
    pub blocked: Duration,
    /// From the start to the last byte in place.
    pub elapsed: Duration,
    pub loads: Vec<LoadStats>,
}

impl PrefetchStats {
    /// Bytes read / bytes needed (1.0 when nothing was needed).
    pub fn read_amplification(&self) -> f64 {
        if self.bytes_needed == 0 {
            1.0
        } else {
            self.bytes_read as f64 / self.bytes_needed as f64
        }
    }
}

impl Loader {
    /// The checked headers of the full chunks covering positions `0..upto` of `tokens`
    /// (no payload is read).
    pub fn chunk_headers(
        &self,
        tokens: &[u32],
        upto: usize,
    ) -> Result<Vec<ChunkHeader>, PrefetchError> {
        let ct = self.spec().chunk_tokens as usize;
        let full = tokens.len() / ct * ct;
        if upto > full {
            return Err(LoaderError::Invalid(format!(
                "{upto} positions are more than the {full} tokens of full chunks"
            ))
            .into());
        }
        self.chunk_keys(&tokens[..upto.div_ceil(ct) * ct])
            .into_iter()
            .map(|c| {
                let path = self.chunk_path(&c.key);
                let err = |source| PrefetchError::Header {
                    chunk: c.index,
                    path: path.clone(),
                    source,
                };
                let f = std::fs::File::open(&path).map_err(|e| err(e.into()))?;
                let h = ChunkHeader::read_from(&f).map_err(err)?;
                check_identity(&h, self.namespace_dir(), &c.key).map_err(err)?;
                Ok(h)
            })
            .collect()
    }

    /// Per layer, the best `share` of the groups of positions `0..upto` by the importance in
    /// the chunk headers, ranked over the whole prefix.
    pub fn importance_selection(
        &self,
        tokens: &[u32],
        upto: usize,
        share: f64,
    ) -> Result<Selection, PrefetchError> {
        if !(share > 0.0 && share <= 1.0) {
            return Err(PrefetchError::Budget(share));
        }
        let imps = self.prefix_importance(tokens, upto)?;
        let imps: Vec<&Importance> = imps.iter().collect();
        let per_chunk = self.spec().chunk_tokens.div_ceil(self.spec().group_tokens);
        Ok(Selection::new(top_share(&imps, per_chunk, share)))
    }

    /// The importance in the headers of the full chunks covering positions `0..upto` of
    /// `tokens`, chunk by chunk (no payload is read); a chunk without it is
    /// [`PrefetchError::NoImportance`].
    pub fn prefix_importance(
        &self,
        tokens: &[u32],
        upto: usize,
    ) -> Result<Vec<Importance>, PrefetchError> {
        self.chunk_headers(tokens, upto)?
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                let path = self.chunk_path(&h.key());
                h.importance
                    .ok_or(PrefetchError::NoImportance { chunk: i, path })
            })
            .collect()
    }

    /// Starts a selective load of `req` (its selection is required) into `dest` that issues
    /// reads per `periods` and `mode` as the caller asks for layers.
    pub fn load_prefetching<'a>(
        &'a self,
        req: &LoadRequest<'a>,
        dest: Dest<'a>,
        periods: Periods,
        mode: Prefetch,
    ) -> Result<PrefetchingLoad<'a>, PrefetchError> {
        let layers = self.spec().num_layers as usize;
        let Some(selection) = req.selection else {
            return Err(LoaderError::Invalid("a prefetching load needs a selection".into()).into());
        };
        if periods.num_layers() != layers {
            return Err(PrefetchError::Periods(format!(
                "periods cover {} layers, the model has {layers}",
                periods.num_layers()
            )));
        }
        if selection.num_layers() != layers {
            return Err(LoaderError::Invalid(format!(
                "selection has {} layers, the model {layers}",
                selection.num_layers()
            ))
            .into());
        }
        let mut load = PrefetchingLoad {
            loader: self,
            tokens: req.tokens,
            range: req.range.clone(),
            verify: req.verify,
            selection: selection.clone(),
            dest,
            periods,
            mode,
            batch_of: vec![None; layers],
            handles: Vec::new(),
            blocked: Duration::ZERO,
            started: Instant::now(),
        };
        if mode == Prefetch::Full {
            load.issue(0..1)?;
        }
        Ok(load)
    }
}

/// A selective load whose reads are issued as the caller advances through the layers. Dropping
/// it cancels what has not started and waits for reads in flight (as [`LoadHandle`] does).
pub struct PrefetchingLoad<'a> {
    loader: &'a Loader,
    tokens: &'a [u32],
    range: Option<Range<usize>>,
    verify: Option<Verify>,
    selection: Selection,
    dest: Dest<'a>,
    periods: Periods,
    mode: Prefetch,
    /// Which handle loads each layer (None: not issued yet).
    batch_of: Vec<Option<usize>>,
    handles: Vec<LoadHandle>,
    blocked: Duration,
    started: Instant,
}

impl std::fmt::Debug for PrefetchingLoad<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefetchingLoad")
            .field("mode", &self.mode)
            .field("periods", &self.periods)
            .field("batches", &self.handles.len())
            .finish_non_exhaustive()
    }
}

impl PrefetchingLoad<'_> {
    /// Issues one selective load for the layers of `layers` not issued yet.
    fn issue(&mut self, layers: Range<usize>) -> Result<(), PrefetchError> {
        let todo: Vec<usize> = layers.filter(|&l| self.batch_of[l].is_none()).collect();
        if todo.is_empty() {
            return Ok(());
        }
        let per_layer = (0..self.batch_of.len())
            .map(|l| {
                if todo.contains(&l) {
                    self.selection.groups(l).to_vec()
                } else {
                    Vec::new()
                }
            })
            .collect();
        let sel = Selection::new(per_layer);
        let req = LoadRequest {
            tokens: self.tokens,
            range: self.range.clone(),
            selection: Some(&sel),
            verify: self.verify,
        };
        let handle = self.loader.load_request(&req, &self.dest)?;
        for l in todo {
            self.batch_of[l] = Some(self.handles.len());
        }
        self.handles.push(handle);
        Ok(())
    }

    /// Returns once `layer`'s selected groups are in place, issuing reads per the schedule
    /// first. Ask for layers in order (any order works, but the schedule assumes this one).
    pub fn wait_layer(&mut self, layer: usize) -> Result<(), PrefetchError> {
        if layer >= self.batch_of.len() {
            return Err(LoaderError::Invalid(format!("no layer {layer}")).into());
        }
        self.issue(layer..layer + 1)?;
        let p = self.periods.of(layer);
        let period = self.periods.ranges()[p].clone();
        if self.mode != Prefetch::Off && layer == period.start {
            self.issue(period)?;
            if self.mode == Prefetch::Full
                && let Some(next) = self.periods.ranges().get(p + 1)
            {
                self.issue(next.start..next.start + 1)?;
            }
        }
        let t = Instant::now();
        let r = self.handles[self.batch_of[layer].unwrap()].wait_layer(layer);
        self.blocked += t.elapsed();
        Ok(r?)
    }

    /// Issues whatever is left, waits for everything, and returns the figures.
    pub fn finish(mut self) -> Result<PrefetchStats, PrefetchError> {
        self.issue(0..self.batch_of.len())?;
        let mut stats = PrefetchStats {
            batches: self.handles.len(),
            bytes_read: 0,
            bytes_needed: 0,
            blocked: self.blocked,
            elapsed: Duration::ZERO,
            loads: Vec::new(),
        };
        for h in self.handles.drain(..) {
            let s = h.wait()?;
            stats.bytes_read += s.bytes_read;
            stats.bytes_needed += s.bytes_needed;
            stats.loads.push(s);
        }
        stats.elapsed = self.started.elapsed();
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_uniform_and_by_similarity() {
        let p = Periods::uniform(7, 3).unwrap();
        assert_eq!(p.ranges(), &[0..3, 3..6, 6..7]);
        assert_eq!((p.of(0), p.of(2), p.of(3), p.of(6)), (0, 0, 1, 2));
        assert!(Periods::uniform(0, 3).is_err());
        assert!(Periods::uniform(3, 0).is_err());
        let s = Selection::new(vec![
            vec![0, 1, 2, 3],
            vec![0, 1, 2, 4],
            vec![7, 8, 9],
            vec![7, 8, 9],
            vec![0, 1, 2, 3],
        ]);
        // 3/5 = 0.6 joins at 0.5; disjoint starts a new period
        let p = Periods::by_similarity(&s, 0.5).unwrap();
        assert_eq!(p.ranges(), &[0..2, 2..4, 4..5]);
        assert_eq!(jaccard(&[], &[]), 1.0);
    }
}
