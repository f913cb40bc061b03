//! The load path of a coded chunk (codec other than raw, format version 2): for each plane
//! and wanted token range, one read of the stored bytes of the groups that cover it (widened
//! to 4096 bytes under O_DIRECT) into the thread's aligned buffer; then each group is decoded
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
        for plane in 0..g.planes {
            for r in ranges {
                let groups = r.start / g.group_tokens..r.end.div_ceil(g.group_tokens);
                let fr = t.groups_range(l, plane, groups);
                let (a0, a1) = if o.file.is_direct() {
                    (fr.start / ALIGN * ALIGN, fr.end.div_ceil(ALIGN) * ALIGN)
                } else {
                    (fr.start, fr.end)
                };
                let s = buf.slice((a1 - a0) as usize);
                o.file.read_exact_at(s, a0)?;
                read += a1 - a0;
                placed +=
                    self.decode_range(o, t, pc, layer, plane, r, (s, a0), shift, &mut runs)?;
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
