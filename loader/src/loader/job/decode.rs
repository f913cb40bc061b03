//! The load path of a coded chunk (codec other than raw, format version 2): for each plane
//! and wanted token range, the stored bytes of the groups that cover it (widened to 4096 bytes
//! under O_DIRECT), with ranges that touch or share a page served by one read, so no page is
//! read twice (coded groups are not page-aligned: a K plane ends in the page where its V plane
//! starts), into the thread's aligned buffer; then each group is decoded
//! into the thread's group scratch ([`codec::with_group_decoded`]) and its wanted rows are
//! scattered into the engine's blocks by the same scatter as raw chunks. Nothing but one group
//! is ever held decoded, so no extra copy of the chunk is made, and layers decode in parallel
//! on the reader threads exactly as raw layers are read.
//!
//! With [`Verify::Full`] the whole layer's stored span is read and checked (stored digest,
//! and the raw digest of the decoded bytes for the lossless codec) before any row is placed.

use super::{LoadJob, Opened, PlanChunk, ReadError};
use crate::codec::stored::{StoredTable, group_shape};
use crate::codec::{self};
use crate::error::FormatError;
use crate::format::{ALIGN, Verify};
use crate::io::AlignedBuf;
use crate::layout::Run;
use std::ops::Range;

impl LoadJob {
    /// Reads and decodes `ranges` (chunk-local tokens) of one layer of a coded chunk; returns
    /// (rows placed, bytes read).
    pub(super) fn read_coded_layer(
        &self,
        o: &Opened,
        t: &StoredTable,
        pc: &PlanChunk,
        layer: usize,
        ranges: &[Range<u32>],
        buf: &mut AlignedBuf,
    ) -> Result<(usize, u64), ReadError> {
        let shift = self.key_shift(o, pc);
        let g = &o.header.geometry;
        let l = layer as u32;
        let mut placed = 0;
        let mut read = 0u64;
        let mut runs = Vec::new();
        if self.verify == Verify::Full {
            let span = t.layer_span(l);
            let s = buf.slice((span.end - span.start) as usize);
            o.file.read_exact_at(s, span.start)?;
            read += span.end - span.start;
            o.header.verify_layer(l, s)?;
            for plane in 0..g.planes {
                for r in ranges {
                    placed += self.decode_range(
                        o,
                        t,
                        pc,
                        layer,
                        plane,
                        r,
                        (s, span.start),
                        shift,
                        &mut runs,
                    )?;
                }
            }
            return Ok((placed, read));
        }
        // The stored bytes of each (plane, range), widened to whole pages under O_DIRECT.
        let direct = o.file.is_direct();
        let wanted: Vec<(u32, &Range<u32>, Range<u64>)> = (0..g.planes)
            .flat_map(|plane| ranges.iter().map(move |r| (plane, r)))
            .map(|(plane, r)| {
                let groups = r.start / g.group_tokens..r.end.div_ceil(g.group_tokens);
                let fr = t.groups_range(l, plane, groups);
                let span = if direct {
                    fr.start / ALIGN * ALIGN..fr.end.div_ceil(ALIGN) * ALIGN
                } else {
                    fr
                };
                (plane, r, span)
            })
            .collect();
        for members in coalesce(&wanted) {
            let a0 = members[0].2.start;
            let a1 = members.iter().map(|m| m.2.end).max().unwrap_or(a0);
            let s = buf.slice((a1 - a0) as usize);
            o.file.read_exact_at(s, a0)?;
            read += a1 - a0;
            for (plane, r, _) in members {
                placed +=
                    self.decode_range(o, t, pc, layer, *plane, r, (s, a0), shift, &mut runs)?;
            }
        }
        Ok((placed, read))
    }

    /// Decodes the groups covering chunk-local tokens `r` of one plane from `src` (file bytes
    /// from offset `base`) and scatters the rows of `r` to their runs (K rotated by `shift`).
    #[allow(clippy::too_many_arguments)]
    fn decode_range(
        &self,
        o: &Opened,
        t: &StoredTable,
        pc: &PlanChunk,
        layer: usize,
        plane: u32,
        r: &Range<u32>,
        (src, base): (&[u8], u64),
        shift: Option<i64>,
        runs: &mut Vec<Run>,
    ) -> Result<usize, ReadError> {
        let g = &o.header.geometry;
        let tb = g.token_bytes as usize;
        let map = self.map.as_map();
        let mut placed = 0;
        for group in r.start / g.group_tokens..r.end.div_ceil(g.group_tokens) {
            let gr = g.group_tokens_range(group);
            let want = gr.start.max(r.start)..gr.end.min(r.end);
            let p0 = pc.start + want.start as usize;
            runs.clear();
            self.layout.runs(
                &map,
                layer,
                plane as usize,
                p0..pc.start + want.end as usize,
                runs,
            );
            if runs.is_empty() {
                continue;
            }
            let shape = group_shape(&o.header.meta, g, plane, group);
            let stored = &src[t.group_in(layer as u32, plane, group, base)];
            let skip = (want.start - gr.start) as usize * tb;
            placed += codec::with_group_decoded(t.codec, &shape, stored, |decoded| {
                self.scatter(plane as usize, runs, p0, &decoded[skip..], tb, shift)
            })
            .map_err(|source| {
                ReadError::Format(FormatError::Decode {
                    layer: layer as u32,
                    plane,
                    group,
                    source,
                })
            })??;
        }
        Ok(placed)
    }
}

/// Splits `spans` (in the order given) into runs that one read serves: a span joins the run
/// before it when it starts inside or right at the end of that run's bytes. Coded groups are
/// not page-aligned, so under O_DIRECT a plane's last page is often the next plane's first (or
/// two chosen groups share a page); one read per run reads each such page once instead of
/// twice, and adjacent spans cost one system call instead of several.
fn coalesce<T>(spans: &[(u32, T, Range<u64>)]) -> impl Iterator<Item = &[(u32, T, Range<u64>)]> {
    let mut rest = spans;
    std::iter::from_fn(move || {
        let first = rest.first()?;
        let (start, mut end) = (first.2.start, first.2.end);
        let mut n = 1;
        while let Some(next) = rest.get(n) {
            if next.2.start < start || next.2.start > end {
                break;
            }
            end = end.max(next.2.end);
            n += 1;
        }
        let (run, tail) = rest.split_at(n);
        rest = tail;
        Some(run)
    })
}

#[cfg(test)]
mod tests {
    use super::coalesce;

    #[test]
    fn spans_that_touch_or_overlap_share_a_read_and_a_gap_starts_another() {
        let spans = [
            (0, (), 0..4096),
            (1, (), 4096..8192),   // touches: same read
            (1, (), 4096..12288),  // overlaps (a shared page): same read
            (1, (), 16384..20480), // a gap: a new read
            (1, (), 8192..12288),  // before the run it follows: a new read, never a wider one
        ];
        let runs: Vec<Vec<u32>> = coalesce(&spans)
            .map(|run| run.iter().map(|s| s.2.start as u32).collect())
            .collect();
        assert_eq!(runs, vec![vec![0, 4096, 4096], vec![16384], vec![8192]]);
    }
}
