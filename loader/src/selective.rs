//! Selective loading (ContiguousKV): which token groups of which layer to read.
//!
//! A chunk stores each plane token-major and cuts it into groups of `group_tokens` tokens
//! (the chunk header's `group_tokens`, from the model spec; 16 by default), so one group of
//! one plane of one layer is one contiguous byte range, aligned to 4096 bytes whenever a
//! group's size is (16 tokens of Llama-3-8B K: 32 KiB). Pruning methods keep a different set
//! of groups per layer; a [`Selection`] names them and the loader reads exactly those ranges
//! (adjacent groups merge into one read), so bytes read / bytes needed is 1.0 at aligned
//! group sizes.
//!
//! Groups are numbered over the whole prefix, chunk by chunk: group `g` is local group
//! `g % groups_per_chunk` of chunk `g / groups_per_chunk`, where `groups_per_chunk =
//! ceil(chunk_tokens / group_tokens)`. When `group_tokens` divides `chunk_tokens` (the
//! default 256 / 16) that is simply tokens `[g * group_tokens, (g + 1) * group_tokens)`.

use std::ops::Range;

/// Per layer, the groups to load (any order, duplicates ignored).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selection {
    layers: Vec<Vec<u32>>,
}

impl Selection {
    /// `per_layer[l]` lists the groups of layer `l` to load; it must have one entry per layer.
    pub fn new(per_layer: Vec<Vec<u32>>) -> Selection {
        let layers = per_layer
            .into_iter()
            .map(|mut g| {
                g.sort_unstable();
                g.dedup();
                g
            })
            .collect();
        Selection { layers }
    }

    /// The same groups in every one of `num_layers` layers.
    pub fn same_for_all(num_layers: usize, groups: Vec<u32>) -> Selection {
        Selection::new(vec![groups; num_layers])
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Sorted, distinct groups of one layer.
    pub fn groups(&self, layer: usize) -> &[u32] {
        &self.layers[layer]
    }

    /// Chunk-local token ranges of chunk `chunk` to read for `layer`, with adjacent groups
    /// merged, intersected with the chunk-local range `within`.
    pub fn chunk_ranges(
        &self,
        layer: usize,
        chunk: usize,
        chunk_tokens: u32,
        group_tokens: u32,
        within: Range<u32>,
    ) -> Vec<Range<u32>> {
        let per_chunk = chunk_tokens.div_ceil(group_tokens) as u64;
        let first = chunk as u64 * per_chunk;
        let groups = &self.layers[layer];
        let lo = groups.partition_point(|&g| (g as u64) < first);
        let hi = groups.partition_point(|&g| (g as u64) < first + per_chunk);
        let mut out: Vec<Range<u32>> = Vec::new();
        for &g in &groups[lo..hi] {
            let local = (g as u64 - first) as u32;
            let start = (local * group_tokens).max(within.start);
            let end = ((local + 1) * group_tokens)
                .min(chunk_tokens)
                .min(within.end);
            if start >= end {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => out.push(start..end),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_merge_and_clip() {
        let s = Selection::new(vec![vec![17, 0, 1, 3, 16, 1]]);
        assert_eq!(s.groups(0), &[0, 1, 3, 16, 17]);
        assert_eq!(s.chunk_ranges(0, 0, 256, 16, 0..256), vec![0..32, 48..64]);
        assert_eq!(s.chunk_ranges(0, 1, 256, 16, 0..256), vec![0..32]);
        assert_eq!(s.chunk_ranges(0, 1, 256, 16, 8..20), vec![8..20]);
        assert!(s.chunk_ranges(0, 2, 256, 16, 0..256).is_empty());
    }

    #[test]
    fn short_last_group() {
        // 40-token chunks, 16-token groups: groups 0..16, 16..32, 32..40 per chunk
        let s = Selection::new(vec![vec![2, 3]]);
        assert_eq!(s.chunk_ranges(0, 0, 40, 16, 0..40), vec![32..40]);
        assert_eq!(s.chunk_ranges(0, 1, 40, 16, 0..40), vec![0..16]);
    }
}
