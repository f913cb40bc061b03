//! Scatter plans: where each byte of the source stream goes in the destination memory.
//!
//! A [`ScatterPlan`] is a list of [`ScatterRun`]s `(src, dst, len)`: `len` bytes starting at
//! source-stream offset `src` go to destination address `dst`. Destinations are addresses in
//! the sink's address space: raw device pointers for the CUDA sinks, offsets into the slice
//! for the host sink. The same plan read backwards is the *gather* of the store path.
//!
//! Plans are validated when built (sorted by source, no two runs writing the same destination
//! byte, layer marks in order) and adjacent runs that continue each other on both sides are
//! merged, so a layout whose token slots are contiguous gives one run per block, not one per
//! token. [`ScatterPlan::from_block_table`] builds the plan of the common case: token-major
//! rows of a chunk's K or V going to `(block, slot)` positions of a paged KV cache through a
//! block table, as vLLM and SGLang lay them out.
//!
//! A plan also carries *layer marks*: `layer_ends[l]` is the source offset by which all of
//! layer `l`'s bytes have arrived. Loads report layer `l` ready once the fill reaching that
//! offset has been scattered, which is what layer-wise loading waits on.

use std::ops::Range;

use crate::error::{GdsError, Result};

/// `len` bytes from source offset `src` to destination address `dst`.
///
/// `repr(C)` because the CUDA sink uploads the run table as-is for the scatter kernel
/// (three little-endian u64 per run).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct ScatterRun {
    /// Source-stream offset.
    pub src: u64,
    /// Destination address.
    pub dst: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Validated, merged runs sorted by source offset, plus layer marks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScatterPlan {
    runs: Vec<ScatterRun>,
    layer_ends: Vec<u64>,
    src_len: u64,
}

/// Geometry of a paged KV cache as seen by one (layer, K-or-V) destination tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedLayout {
    /// Tokens per block.
    pub block_size: u64,
    /// Bytes between the starts of consecutive blocks.
    pub block_stride: u64,
    /// Bytes between the starts of consecutive token slots within a block.
    pub slot_stride: u64,
    /// Bytes of one token row (heads x head dim x dtype size); `<= slot_stride`.
    pub row_bytes: u64,
}

/// A token-major run of rows in the source stream and the tensor it goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Layer the rows belong to (for layer-ready marks).
    pub layer: u32,
    /// Source-stream offset of the first row.
    pub src_offset: u64,
    /// Base address of the destination tensor (this layer's K or V cache).
    pub dst_base: u64,
    /// Sequence position of the first row (indexes the block table).
    pub first_token: u64,
    /// Number of rows.
    pub n_tokens: u64,
}

impl ScatterPlan {
    /// Validates and normalises `runs`; `layer_ends` must be non-decreasing.
    ///
    /// Errors: runs whose sources or destinations overlap, zero-length or overflowing runs,
    /// decreasing layer marks.
    pub fn new(mut runs: Vec<ScatterRun>, layer_ends: Vec<u64>) -> Result<Self> {
        for r in &runs {
            if r.len == 0
                || r.src.checked_add(r.len).is_none()
                || r.dst.checked_add(r.len).is_none()
            {
                return Err(GdsError::InvalidPlan(format!("bad run {r:?}")));
            }
        }
        runs.sort_unstable_by_key(|r| r.src);
        for w in runs.windows(2) {
            if w[0].src + w[0].len > w[1].src {
                return Err(GdsError::InvalidPlan(format!(
                    "runs {:?} and {:?} read the same source bytes",
                    w[0], w[1]
                )));
            }
        }
        let mut by_dst: Vec<(u64, u64)> = runs.iter().map(|r| (r.dst, r.len)).collect();
        by_dst.sort_unstable();
        for w in by_dst.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                return Err(GdsError::InvalidPlan(format!(
                    "destinations {:#x}+{} and {:#x}+{} overlap",
                    w[0].0, w[0].1, w[1].0, w[1].1
                )));
            }
        }
        if layer_ends.windows(2).any(|w| w[0] > w[1]) {
            return Err(GdsError::InvalidPlan(format!(
                "layer marks must not decrease: {layer_ends:?}"
            )));
        }
        let mut merged: Vec<ScatterRun> = Vec::with_capacity(runs.len());
        for r in runs {
            match merged.last_mut() {
                Some(m) if m.src + m.len == r.src && m.dst + m.len == r.dst => m.len += r.len,
                _ => merged.push(r),
            }
        }
        let src_len = merged.last().map_or(0, |r| r.src + r.len);
        let src_len = src_len.max(layer_ends.last().copied().unwrap_or(0));
        Ok(ScatterPlan {
            runs: merged,
            layer_ends,
            src_len,
        })
    }

    /// One run: the first `len` source bytes go to `dst`, as one layer.
    pub fn contiguous(dst: u64, len: u64) -> Result<Self> {
        Self::new(vec![ScatterRun { src: 0, dst, len }], vec![len])
    }

    /// Builds the plan for rows going to paged blocks through `block_table`
    /// (`block_table[t / block_size]` is the block of sequence position `t`).
    ///
    /// Segments must come in non-decreasing layer order along the source stream (layer-major
    /// payloads); layer marks are derived from them, and a layer with no segment is ready
    /// when the layer before it is.
    pub fn from_block_table(
        layout: &PagedLayout,
        block_table: &[u32],
        segments: &[Segment],
    ) -> Result<Self> {
        let PagedLayout {
            block_size,
            block_stride,
            slot_stride,
            row_bytes,
        } = *layout;
        if block_size == 0 || row_bytes == 0 || slot_stride < row_bytes {
            return Err(GdsError::InvalidPlan(format!(
                "layout {layout:?}: need block_size > 0 and slot_stride >= row_bytes > 0"
            )));
        }
        let mut segs: Vec<&Segment> = segments.iter().filter(|s| s.n_tokens > 0).collect();
        segs.sort_by_key(|s| s.src_offset);
        let mut layer_ends: Vec<u64> = Vec::new();
        let mut runs = Vec::new();
        for s in segs {
            let layer = s.layer as usize;
            if layer + 1 < layer_ends.len() {
                return Err(GdsError::InvalidPlan(format!(
                    "segment of layer {layer} at source {} follows a later layer",
                    s.src_offset
                )));
            }
            let end = s.src_offset + s.n_tokens * row_bytes;
            while layer_ends.len() <= layer {
                let prev = layer_ends.last().copied().unwrap_or(0);
                layer_ends.push(prev);
            }
            layer_ends[layer] = layer_ends[layer].max(end);
            for i in 0..s.n_tokens {
                let t = s.first_token + i;
                let blk = *block_table.get((t / block_size) as usize).ok_or_else(|| {
                    GdsError::InvalidPlan(format!(
                        "token {t} needs block-table entry {} but the table has {}",
                        t / block_size,
                        block_table.len()
                    ))
                })? as u64;
                let dst = s.dst_base + blk * block_stride + (t % block_size) * slot_stride;
                let src = s.src_offset + i * row_bytes;
                match runs.last_mut() {
                    Some(ScatterRun {
                        src: ps,
                        dst: pd,
                        len,
                    }) if *ps + *len == src && *pd + *len == dst => *len += row_bytes,
                    _ => runs.push(ScatterRun {
                        src,
                        dst,
                        len: row_bytes,
                    }),
                }
            }
        }
        Self::new(runs, layer_ends)
    }

    /// The runs, sorted by source offset.
    pub fn runs(&self) -> &[ScatterRun] {
        &self.runs
    }

    /// Source offset by which each layer is complete.
    pub fn layer_ends(&self) -> &[u64] {
        &self.layer_ends
    }

    /// Number of layers the plan marks.
    pub fn layers(&self) -> usize {
        self.layer_ends.len()
    }

    /// One past the highest source offset the plan reads.
    pub fn src_len(&self) -> u64 {
        self.src_len
    }

    /// Indices of the runs that intersect source range `[start, end)`.
    pub fn runs_overlapping(&self, start: u64, end: u64) -> Range<usize> {
        let lo = self.runs.partition_point(|r| r.src + r.len <= start);
        let hi = self.runs.partition_point(|r| r.src < end);
        lo..hi.max(lo)
    }

    /// Calls `f(offset_in_window, dst, len)` for every piece of every run inside the window
    /// `[start, start + len)` of the source stream, in source order.
    pub fn for_each_in_window(&self, start: u64, len: u64, mut f: impl FnMut(u64, u64, u64)) {
        let end = start + len;
        for r in &self.runs[self.runs_overlapping(start, end)] {
            let lo = r.src.max(start);
            let hi = (r.src + r.len).min(end);
            if lo < hi {
                f(lo - start, r.dst + (lo - r.src), hi - lo);
            }
        }
    }

    /// Number of layers complete once source bytes `[0, stream_end)` have been scattered.
    pub fn layers_complete_at(&self, stream_end: u64) -> usize {
        self.layer_ends.partition_point(|&e| e <= stream_end)
    }

    /// Reference implementation: scatters `src` (the whole stream) into `dst` (addresses are
    /// offsets into `dst`). Used by the host path's tests as the oracle.
    pub fn apply_host(&self, src: &[u8], dst: &mut [u8]) -> Result<()> {
        if (src.len() as u64) < self.src_len {
            return Err(GdsError::PlanExceedsExtents {
                plan_len: self.src_len,
                extents_len: src.len() as u64,
            });
        }
        for r in &self.runs {
            let d = host_range(r.dst, r.len, dst.len())?;
            dst[d].copy_from_slice(&src[r.src as usize..(r.src + r.len) as usize]);
        }
        Ok(())
    }
}

/// Bounds-checks `[addr, addr+len)` against a host destination of `cap` bytes.
pub(crate) fn host_range(addr: u64, len: u64, cap: usize) -> Result<Range<usize>> {
    match addr.checked_add(len) {
        Some(end) if end <= cap as u64 => Ok(addr as usize..end as usize),
        _ => Err(GdsError::DestinationOutOfBounds {
            addr,
            len,
            cap: cap as u64,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(src: u64, dst: u64, len: u64) -> ScatterRun {
        ScatterRun { src, dst, len }
    }

    #[test]
    fn adjacent_runs_merge_and_overlaps_are_rejected() {
        let p = ScatterPlan::new(vec![run(10, 110, 5), run(0, 100, 10)], vec![15]).unwrap();
        assert_eq!(p.runs(), &[run(0, 100, 15)]);
        assert!(matches!(
            ScatterPlan::new(vec![run(0, 0, 10), run(5, 100, 10)], vec![]),
            Err(GdsError::InvalidPlan(_))
        ));
        assert!(matches!(
            ScatterPlan::new(vec![run(0, 0, 10), run(10, 9, 10)], vec![]),
            Err(GdsError::InvalidPlan(_))
        ));
        assert!(matches!(
            ScatterPlan::new(vec![run(0, 0, 0)], vec![]),
            Err(GdsError::InvalidPlan(_))
        ));
        assert!(matches!(
            ScatterPlan::new(vec![run(0, 0, 4)], vec![4, 2]),
            Err(GdsError::InvalidPlan(_))
        ));
    }

    #[test]
    fn block_table_plan_coalesces_contiguous_slots() {
        // flash-attn style: slots contiguous, block = block_size rows.
        let layout = PagedLayout {
            block_size: 4,
            block_stride: 4 * 8,
            slot_stride: 8,
            row_bytes: 8,
        };
        let seg = |layer, src_offset, dst_base| Segment {
            layer,
            src_offset,
            dst_base,
            first_token: 2,
            n_tokens: 6,
        };
        // tokens 2..8: block_table[0] = 5 (slots 2,3), block_table[1] = 6 (slots 0..4): the
        // two blocks are adjacent so the 6 rows form one run.
        let p = ScatterPlan::from_block_table(&layout, &[5, 6], &[seg(0, 0, 0), seg(1, 48, 1000)])
            .unwrap();
        assert_eq!(
            p.runs(),
            &[run(0, 5 * 32 + 16, 48), run(48, 1000 + 176, 48)]
        );
        assert_eq!(p.layer_ends(), &[48, 96]);
        // Non-adjacent blocks split the run at the block boundary.
        let p = ScatterPlan::from_block_table(&layout, &[5, 1], &[seg(0, 0, 0)]).unwrap();
        assert_eq!(p.runs(), &[run(0, 176, 16), run(16, 32, 32)]);
    }

    #[test]
    fn block_table_errors_are_typed() {
        let layout = PagedLayout {
            block_size: 4,
            block_stride: 64,
            slot_stride: 16,
            row_bytes: 16,
        };
        let seg = Segment {
            layer: 0,
            src_offset: 0,
            dst_base: 0,
            first_token: 0,
            n_tokens: 9,
        };
        // 9 tokens need 3 blocks.
        assert!(matches!(
            ScatterPlan::from_block_table(&layout, &[0, 1], &[seg]),
            Err(GdsError::InvalidPlan(_))
        ));
        // Two tokens in the same block slot.
        assert!(matches!(
            ScatterPlan::from_block_table(&layout, &[0, 0, 1], &[seg]),
            Err(GdsError::InvalidPlan(_))
        ));
        // Layers out of order along the stream.
        let later = Segment { layer: 3, ..seg };
        let earlier = Segment {
            layer: 1,
            src_offset: 1000,
            dst_base: 10_000,
            ..seg
        };
        assert!(matches!(
            ScatterPlan::from_block_table(&layout, &[0, 1, 2], &[later, earlier]),
            Err(GdsError::InvalidPlan(_))
        ));
        let bad = PagedLayout {
            slot_stride: 8,
            ..layout
        };
        assert!(matches!(
            ScatterPlan::from_block_table(&bad, &[0, 1, 2], &[seg]),
            Err(GdsError::InvalidPlan(_))
        ));
    }

    #[test]
    fn windows_clip_runs() {
        let p = ScatterPlan::new(vec![run(0, 100, 10), run(20, 200, 10)], vec![10, 30]).unwrap();
        let mut got = Vec::new();
        p.for_each_in_window(5, 20, |o, d, l| got.push((o, d, l)));
        assert_eq!(got, vec![(0, 105, 5), (15, 200, 5)]);
        assert_eq!(p.runs_overlapping(10, 20), 1..1);
        assert_eq!(p.layers_complete_at(9), 0);
        assert_eq!(p.layers_complete_at(10), 1);
        assert_eq!(p.layers_complete_at(30), 2);
        let mut dst = vec![0u8; 150];
        assert!(matches!(
            p.apply_host(&[1u8; 30], &mut dst),
            Err(GdsError::DestinationOutOfBounds { .. })
        ));
        assert!(matches!(
            p.apply_host(&[1u8; 20], &mut vec![0u8; 300]),
            Err(GdsError::PlanExceedsExtents { .. })
        ));
    }
}
