//! Remote prefix lookup: how many leading chunks of a prompt exist in the bucket.
//!
//! Asking chunk by chunk costs one round trip per chunk (512 round trips for a 128k-token
//! prompt). The chain property (chunk i's key depends on all earlier chunks) makes presence
//! nearly monotone: a host that computed chunk i also computed its ancestors. So:
//!
//! 1. **Gallop**, one wave: HEAD indices 0, 1, 3, 7, ..., 2^k - 1 and n - 1 in parallel. The
//!    first absent probe bounds the answer from above (`hi`); the last present probe below it
//!    is a candidate lower bound (`lo`).
//! 2. **k-ary search** between `lo` and `hi`: each wave probes up to `P` evenly spaced indices
//!    in parallel (`P` = `lookup_parallelism`), shrinking the gap by a factor of `P + 1`.
//! 3. **Verify**: write-behind uploads are not ordered, so "i present" does not prove that its
//!    ancestors arrived. Every index in `0..=lo` not probed yet is HEADed, in waves of `P`; the
//!    answer is the first absent index, or `lo + 1`.
//!
//! Round trips are counted as waves of at most `P` concurrent requests (the critical path);
//! requests are counted one by one. For 512 present chunks with `P` = 128 that is 1 gallop
//! wave + 4 verification waves = 5 round trips instead of 512.

use crate::client::Bucket;
use crate::error::RemoteError;
use futures::StreamExt;
use kvfs_loader::ChunkKey;

/// Result of a remote prefix lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixLookup {
    /// Leading chunks present remotely: `keys[..present]` all exist.
    pub present: usize,
    /// HEAD requests sent.
    pub requests: usize,
    /// Sequential waves of parallel requests (the latency in round trips).
    pub round_trips: usize,
}

struct Probe<'a> {
    bucket: &'a Bucket,
    ns_dir: &'a str,
    keys: &'a [ChunkKey],
    known: Vec<Option<bool>>,
    requests: usize,
    round_trips: usize,
    parallel: usize,
}

impl Probe<'_> {
    async fn wave(&mut self, mut idx: Vec<usize>) -> Result<(), RemoteError> {
        idx.retain(|&i| self.known[i].is_none());
        idx.sort_unstable();
        idx.dedup();
        if idx.is_empty() {
            return Ok(());
        }
        self.requests += idx.len();
        self.round_trips += idx.len().div_ceil(self.parallel);
        let bucket = self.bucket;
        let ns_dir = self.ns_dir;
        let keys = self.keys;
        let results: Vec<(usize, Result<Option<u64>, RemoteError>)> = futures::stream::iter(idx)
            .map(|i| async move {
                let path = bucket.chunk_path(ns_dir, &keys[i]);
                (i, bucket.head(&path).await)
            })
            .buffer_unordered(self.parallel)
            .collect()
            .await;
        for (i, r) in results {
            self.known[i] = Some(r?.is_some());
        }
        Ok(())
    }

    /// First known-absent index and the last known-present index below it.
    fn bounds(&self) -> (Option<usize>, usize) {
        let n = self.keys.len();
        let hi = (0..n).find(|&i| self.known[i] == Some(false)).unwrap_or(n);
        let lo = (0..hi).rev().find(|&i| self.known[i] == Some(true));
        (lo, hi)
    }
}

pub(crate) async fn prefix_lookup(
    bucket: &Bucket,
    ns_dir: &str,
    keys: &[ChunkKey],
) -> Result<PrefixLookup, RemoteError> {
    let n = keys.len();
    let mut p = Probe {
        bucket,
        ns_dir,
        keys,
        known: vec![None; n],
        requests: 0,
        round_trips: 0,
        parallel: bucket.cfg.lookup_parallelism.max(1),
    };
    if n == 0 {
        return Ok(PrefixLookup {
            present: 0,
            requests: 0,
            round_trips: 0,
        });
    }
    // 1. Gallop.
    let mut probes: Vec<usize> = (0..usize::BITS)
        .map(|k| (1usize << k) - 1)
        .take_while(|&i| i < n)
        .collect();
    probes.push(n - 1);
    p.wave(probes).await?;
    // 2. k-ary search between the bounds.
    loop {
        let (lo, hi) = p.bounds();
        let start = lo.map_or(0, |l| l + 1);
        let gap = hi - start;
        if gap == 0 {
            break;
        }
        let picks: Vec<usize> = if gap <= p.parallel {
            (start..hi).collect()
        } else {
            (1..=p.parallel)
                .map(|j| start + j * gap / (p.parallel + 1))
                .collect()
        };
        p.wave(picks).await?;
    }
    // 3. Verify the whole prefix below the answer.
    let (lo, _) = p.bounds();
    if let Some(lo) = lo {
        let unknown: Vec<usize> = (0..=lo).filter(|&i| p.known[i].is_none()).collect();
        for batch in unknown.chunks(p.parallel) {
            p.wave(batch.to_vec()).await?;
            if batch.iter().any(|&i| p.known[i] == Some(false)) {
                break;
            }
        }
    }
    let present = (0..n).find(|&i| p.known[i] != Some(true)).unwrap_or(n);
    Ok(PrefixLookup {
        present,
        requests: p.requests,
        round_trips: p.round_trips,
    })
}
