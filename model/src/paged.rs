//! The KV cache in paged blocks, as vLLM's flash-attn back end lays it out: per layer one f32
//! buffer `[2, num_blocks, block_size, kv_heads, head_dim]` (K blocks, then V blocks), and a
//! block table mapping the sequence's logical blocks to physical ones.
//!
//! The forward pass writes each new token's K and V rows into their slots and gathers the
//! sequence's rows back for attention; kvfs sees the same memory through
//! [`PagedKv::layout`], a `KvLayout::vllm_flash_attn` over the layer buffers, so the loader
//! loads cached chunks straight into the blocks and stores prefilled blocks as chunks. The
//! default block table is deliberately not the identity (logical block `i` lives in physical
//! block `num_blocks - 1 - i`), so a mistake in paging anywhere shows up as wrong output.

use kvfs_loader::{BlockMap, Dtype, KvLayout, LayoutError, RawRegion};

/// Paged f32 KV memory for one sequence.
#[derive(Debug)]
pub struct PagedKv {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    layers: Vec<Vec<f32>>,
    block_table: Vec<u32>,
}

impl PagedKv {
    /// Room for `max_tokens` positions in blocks of `block_size`.
    pub fn new(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        max_tokens: usize,
    ) -> PagedKv {
        let num_blocks = max_tokens.div_ceil(block_size).max(1);
        let per_layer = 2 * num_blocks * block_size * kv_heads * head_dim;
        PagedKv {
            num_layers,
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
            layers: (0..num_layers).map(|_| vec![0f32; per_layer]).collect(),
            block_table: (0..num_blocks as u32).rev().collect(),
        }
    }

    /// Positions this cache can hold.
    pub fn capacity(&self) -> usize {
        self.num_blocks * self.block_size
    }

    fn row(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Element offset of position `pos`'s row in plane 0 (K); V is `half()` further.
    fn slot(&self, pos: usize) -> usize {
        let block = self.block_table[pos / self.block_size] as usize;
        (block * self.block_size + pos % self.block_size) * self.row()
    }

    fn half(&self) -> usize {
        self.num_blocks * self.block_size * self.row()
    }

    /// Writes rows for positions `start..start + n` (`k` and `v` are `[n, kv_heads, head_dim]`).
    pub fn write(&mut self, layer: usize, start: usize, k: &[f32], v: &[f32]) {
        let row = self.row();
        let half = self.half();
        for (i, (kr, vr)) in k.chunks_exact(row).zip(v.chunks_exact(row)).enumerate() {
            let s = self.slot(start + i);
            let buf = &mut self.layers[layer];
            buf[s..s + row].copy_from_slice(kr);
            buf[half + s..half + s + row].copy_from_slice(vr);
        }
    }

    /// The K row of position `pos` in `layer` (`[kv_heads, head_dim]`).
    pub fn k_row(&self, layer: usize, pos: usize) -> &[f32] {
        let s = self.slot(pos);
        &self.layers[layer][s..s + self.row()]
    }

    /// The V row of position `pos` in `layer` (`[kv_heads, head_dim]`).
    pub fn v_row(&self, layer: usize, pos: usize) -> &[f32] {
        let s = self.half() + self.slot(pos);
        &self.layers[layer][s..s + self.row()]
    }

    /// Gathers K and V of `positions`, in order, head-major: `[kv_heads, len, head_dim]`, the
    /// layout attention multiplies with (no transposing copy after the gather).
    pub fn gather_heads(
        &self,
        layer: usize,
        positions: impl ExactSizeIterator<Item = usize> + Clone,
    ) -> (Vec<f32>, Vec<f32>) {
        let (hd, len) = (self.head_dim, positions.len());
        let half = self.half();
        let buf = &self.layers[layer];
        let mut k = vec![0f32; self.kv_heads * len * hd];
        let mut v = vec![0f32; self.kv_heads * len * hd];
        for (i, pos) in positions.enumerate() {
            let s = self.slot(pos);
            for h in 0..self.kv_heads {
                let (src, dst) = (s + h * hd, (h * len + i) * hd);
                k[dst..dst + hd].copy_from_slice(&buf[src..src + hd]);
                v[dst..dst + hd].copy_from_slice(&buf[half + src..half + src + hd]);
            }
        }
        (k, v)
    }

    /// Gathers K and V rows of `positions`, in order, into contiguous
    /// `[len, kv_heads, head_dim]` (the layout [`PagedKv::write`] takes).
    pub fn gather_rows(
        &self,
        layer: usize,
        positions: impl ExactSizeIterator<Item = usize>,
    ) -> (Vec<f32>, Vec<f32>) {
        let row = self.row();
        let half = self.half();
        let buf = &self.layers[layer];
        let mut k = Vec::with_capacity(positions.len() * row);
        let mut v = Vec::with_capacity(positions.len() * row);
        for pos in positions {
            let s = self.slot(pos);
            k.extend_from_slice(&buf[s..s + row]);
            v.extend_from_slice(&buf[half + s..half + s + row]);
        }
        (k, v)
    }

    /// A copy of layers `0..layers` (same blocks and block table): scratch memory for a pass
    /// that must not change this cache.
    pub fn clone_layers(&self, layers: usize) -> PagedKv {
        PagedKv {
            num_layers: layers,
            layers: self.layers[..layers].to_vec(),
            block_table: self.block_table.clone(),
            ..*self
        }
    }

    /// The block table (logical block -> physical block).
    pub fn block_table(&self) -> &[u32] {
        &self.block_table
    }

    /// The block map the loader uses for this sequence.
    pub fn block_map(&self) -> BlockMap<'_> {
        BlockMap::Blocks(&self.block_table)
    }

    /// The layer buffers as kvfs sees them. Borrowing `self` mutably for the layout's lifetime
    /// keeps the forward pass from touching the memory while a load or store uses it.
    pub fn layout(&mut self) -> Result<KvLayout, LayoutError> {
        let regions: Vec<RawRegion> = self
            .layers
            .iter_mut()
            .map(|l| RawRegion::new(l.as_mut_ptr().cast::<u8>(), l.len() * 4))
            .collect();
        // SAFETY: each region is a live Vec<f32> of exactly the given byte length, owned by
        // `self`; callers hold `&mut self` (see `Session::store`/`load`) until the load or
        // store using the layout has finished, so nothing else reads or writes the buffers
        // meanwhile, and the Vecs are never resized after `new`.
        unsafe {
            KvLayout::vllm_flash_attn(
                &regions,
                self.num_blocks,
                self.block_size,
                self.kv_heads as u32,
                self.head_dim as u32,
                Dtype::F32,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_through_a_permuted_block_table() {
        let mut kv = PagedKv::new(2, 3, 4, 16, 40);
        assert_eq!(kv.num_blocks, 3);
        assert_eq!(kv.block_table(), &[2, 1, 0]);
        let row = 12;
        let k: Vec<f32> = (0..40 * row).map(|x| x as f32).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        kv.write(1, 0, &k[..20 * row], &v[..20 * row]);
        kv.write(1, 20, &k[20 * row..], &v[20 * row..]);
        let (gk, gv) = kv.gather_rows(1, 0..40);
        assert_eq!(gk, k);
        assert_eq!(gv, v);
        // head-major: head h of the i-th asked position at (h * 3 + i) * head_dim
        let (hk, hv) = kv.gather_heads(1, [3usize, 17, 39].into_iter());
        for (i, p) in [3usize, 17, 39].into_iter().enumerate() {
            for h in 0..3 {
                let (dst, src) = ((h * 3 + i) * 4, p * row + h * 4);
                assert_eq!(hk[dst..dst + 4], k[src..src + 4]);
                assert_eq!(hv[dst..dst + 4], v[src..src + 4]);
            }
        }
        // Position 0 lives in physical block 2.
        assert_eq!(kv.layers[1][2 * 16 * row], 0.0);
        assert_eq!(kv.layers[1][2 * 16 * row + 1], 1.0);
        assert!(kv.layout().is_ok());
    }
}
