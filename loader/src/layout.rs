//! Engine KV memory as the loader sees it: base addresses and strides, nothing more.
//!
//! Every engine layout kvfs targets stores one token's K (or V, or MLA latent) of one layer as
//! a contiguous `[heads, head_dim]` row; what differs is where the rows of a block live. So a
//! [`KvLayout`] is, per layer and plane (0 = K or latent, 1 = V), a base address, plus three
//! numbers shared by all layers: `block_size` (tokens per block), `block_stride` (bytes between
//! blocks) and `token_stride` (bytes between the slots of a block). The address of slot `s` is
//! `base + (s / block_size) * block_stride + (s % block_size) * token_stride`:
//!
//! | engine layout (per layer)                        | planes' bases         | block_stride  |
//! |--------------------------------------------------|-----------------------|---------------|
//! | vLLM flash-attn `[2, blocks, bs, heads, dim]`    | `p`, `p + blocks*B`   | `B`           |
//! | vLLM flashinfer `[blocks, 2, bs, heads, dim]`    | `p`, `p + B`          | `2 * B`       |
//! | MLA `[blocks, bs, latent]`                       | `p`                   | `B`           |
//! | SGLang token pool `[tokens, heads, dim]` K and V | `k`, `v`              | `row`         |
//!
//! where `row = heads * dim * dtype size` and `B = bs * row`; SGLang's pools are block size 1.
//!
//! Which slots a load fills comes from a [`BlockMap`]: a block table (position `p` -> block
//! `table[p / bs]`, slot `p % bs`, as vLLM) or a slot mapping (position -> slot, as SGLang's
//! `out_cache_loc` and vLLM's `slot_mapping`; negative slots are padding and skipped).
//!
//! The engine owns the memory, so the constructors are `unsafe`: the caller promises that the
//! regions it names stay valid, writable and otherwise untouched while a load or store that
//! uses the layout runs. What can be checked is checked: every constructor takes each region's
//! byte length and refuses a shape that would reach past it, and [`KvLayout::check_map`]
//! refuses block ids and slots outside the layout before any byte moves.
//!
//! The addresses may also be device addresses: the layout only does arithmetic on them. Which
//! back end moves the bytes (host memcpy now, CUDA later) is [`crate::backend::Backend`].

use crate::spec::{Dtype, KvKind, ModelSpec};
use std::ops::Range;

/// A layout or block map does not fit the memory or the model it is used with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("a layer region of {have} bytes is too small: the shape needs {need}")]
    RegionTooSmall { need: usize, have: usize },
    #[error("layout shape is invalid: {0}")]
    Shape(String),
    #[error("layout holds {what} = {layout}, the model spec says {spec}")]
    SpecMismatch {
        what: &'static str,
        layout: String,
        spec: String,
    },
    #[error("block id {block} at table index {index} is outside the layout's {num_blocks} blocks")]
    BlockOutOfRange {
        index: usize,
        block: u32,
        num_blocks: usize,
    },
    #[error("slot {slot} at position {position} is outside the layout's {num_slots} slots")]
    SlotOutOfRange {
        position: usize,
        slot: i64,
        num_slots: usize,
    },
    #[error("the block map covers {covered} token positions, the request needs {needed}")]
    MapTooShort { covered: usize, needed: usize },
}

/// One engine memory region: where it starts and how many bytes it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRegion {
    pub ptr: *mut u8,
    pub len: usize,
}

impl RawRegion {
    pub fn new(ptr: *mut u8, len: usize) -> RawRegion {
        RawRegion { ptr, len }
    }

    /// The region of a byte slice. Taking the pointer is safe; using it is what the `unsafe`
    /// layout constructors promise about.
    pub fn of(slice: &mut [u8]) -> RawRegion {
        RawRegion {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
        }
    }
}

/// Which engine layout a [`KvLayout`] was built for (for logs and the integration guide).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutKind {
    VllmFlashAttn,
    VllmFlashInfer,
    Mla,
    TokenPool,
    Custom,
}

/// An engine's paged KV memory: base address per layer and plane, and strides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLayout {
    kind: LayoutKind,
    dtype: Dtype,
    kv_kind: KvKind,
    heads: u32,
    head_dim: u32,
    block_size: usize,
    num_blocks: usize,
    block_stride: usize,
    token_stride: usize,
    /// Per layer, per plane: base address (as an integer: the layout never dereferences it).
    bases: Vec<[usize; 2]>,
}

// SAFETY: a KvLayout is addresses and numbers; it never dereferences them itself. Sending it
// to reader threads is what the unsafe constructors' contract covers (the memory stays valid
// and is not touched by others while loads run).
unsafe impl Send for KvLayout {}
// SAFETY: as above; shared access only reads the numbers.
unsafe impl Sync for KvLayout {}

/// Geometry of a layout given to [`KvLayout::from_raw`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strides {
    pub block_size: usize,
    pub num_blocks: usize,
    /// Bytes between the starts of consecutive blocks.
    pub block_stride: usize,
    /// Bytes between consecutive slots of a block (at least one token row).
    pub token_stride: usize,
}

impl KvLayout {
    /// A layout from explicit bases and strides. `planes[layer]` holds one region per plane
    /// (two for K/V, one for MLA); each region must hold every slot of the layout.
    ///
    /// # Safety
    /// Every region must stay valid for reads and writes, and must not be accessed by anything
    /// else, for as long as a load or store using this layout (or a clone of it) runs, that is
    /// until its `LoadHandle` is waited for or dropped.
    pub unsafe fn from_raw(
        kind: LayoutKind,
        dtype: Dtype,
        kv_kind: KvKind,
        heads: u32,
        head_dim: u32,
        strides: Strides,
        planes: &[Vec<RawRegion>],
    ) -> Result<KvLayout, LayoutError> {
        let row = row_bytes(dtype, heads, head_dim)?;
        let Strides {
            block_size,
            num_blocks,
            block_stride,
            token_stride,
        } = strides;
        if block_size == 0 || num_blocks == 0 {
            return Err(LayoutError::Shape(
                "block size and block count must be positive".into(),
            ));
        }
        if token_stride < row {
            return Err(LayoutError::Shape(format!(
                "token stride {token_stride} is below one token row ({row} bytes)"
            )));
        }
        if kv_kind == KvKind::MlaLatent && heads != 1 {
            return Err(LayoutError::Shape("an MLA latent has one head".into()));
        }
        if planes.is_empty() {
            return Err(LayoutError::Shape("no layers".into()));
        }
        // Highest byte any slot touches, relative to the base.
        let need = (num_blocks - 1)
            .checked_mul(block_stride)
            .and_then(|v| v.checked_add((block_size - 1).checked_mul(token_stride)?))
            .and_then(|v| v.checked_add(row))
            .ok_or_else(|| LayoutError::Shape("shape overflows".into()))?;
        let mut bases = Vec::with_capacity(planes.len());
        for regions in planes {
            if regions.len() != kv_kind.planes() {
                return Err(LayoutError::Shape(format!(
                    "{} regions for a layer, {} needs {}",
                    regions.len(),
                    kv_kind.name(),
                    kv_kind.planes()
                )));
            }
            let mut b = [0usize; 2];
            for (i, r) in regions.iter().enumerate() {
                if r.ptr.is_null() {
                    return Err(LayoutError::Shape("null base pointer".into()));
                }
                if r.len < need {
                    return Err(LayoutError::RegionTooSmall { need, have: r.len });
                }
                b[i] = r.ptr as usize;
            }
            bases.push(b);
        }
        Ok(KvLayout {
            kind,
            dtype,
            kv_kind,
            heads,
            head_dim,
            block_size,
            num_blocks,
            block_stride,
            token_stride,
            bases,
        })
    }

    /// vLLM flash-attn: per layer one tensor `[2, num_blocks, block_size, num_kv_heads,
    /// head_size]` (K blocks, then V blocks). `layers[i]` is layer i's tensor.
    ///
    /// # Safety
    /// As [`KvLayout::from_raw`].
    pub unsafe fn vllm_flash_attn(
        layers: &[RawRegion],
        num_blocks: usize,
        block_size: usize,
        num_kv_heads: u32,
        head_size: u32,
        dtype: Dtype,
    ) -> Result<KvLayout, LayoutError> {
        let row = row_bytes(dtype, num_kv_heads, head_size)?;
        let block = block_size * row;
        let half = num_blocks * block;
        let planes = split_layers(layers, 2 * half, |r| {
            vec![
                RawRegion::new(r.ptr, half),
                // wrapping: no dereference, and the length check above keeps it in bounds
                RawRegion::new(r.ptr.wrapping_add(half), half),
            ]
        })?;
        let strides = Strides {
            block_size,
            num_blocks,
            block_stride: block,
            token_stride: row,
        };
        // SAFETY: forwarded from this function's contract.
        unsafe {
            KvLayout::from_raw(
                LayoutKind::VllmFlashAttn,
                dtype,
                KvKind::KeyValue,
                num_kv_heads,
                head_size,
                strides,
                &planes,
            )
        }
    }

    /// vLLM flashinfer: per layer one tensor `[num_blocks, 2, block_size, num_kv_heads,
    /// head_size]` (K and V of a block side by side).
    ///
    /// # Safety
    /// As [`KvLayout::from_raw`].
    pub unsafe fn vllm_flashinfer(
        layers: &[RawRegion],
        num_blocks: usize,
        block_size: usize,
        num_kv_heads: u32,
        head_size: u32,
        dtype: Dtype,
    ) -> Result<KvLayout, LayoutError> {
        let row = row_bytes(dtype, num_kv_heads, head_size)?;
        let block = block_size * row;
        let total = num_blocks * 2 * block;
        let planes = split_layers(layers, total, |r| {
            vec![
                RawRegion::new(r.ptr, total - block),
                RawRegion::new(r.ptr.wrapping_add(block), total - block),
            ]
        })?;
        let strides = Strides {
            block_size,
            num_blocks,
            block_stride: 2 * block,
            token_stride: row,
        };
        // SAFETY: forwarded from this function's contract.
        unsafe {
            KvLayout::from_raw(
                LayoutKind::VllmFlashInfer,
                dtype,
                KvKind::KeyValue,
                num_kv_heads,
                head_size,
                strides,
                &planes,
            )
        }
    }

    /// MLA latents: per layer one tensor `[num_blocks, block_size, latent_dim]`.
    ///
    /// # Safety
    /// As [`KvLayout::from_raw`].
    pub unsafe fn mla(
        layers: &[RawRegion],
        num_blocks: usize,
        block_size: usize,
        latent_dim: u32,
        dtype: Dtype,
    ) -> Result<KvLayout, LayoutError> {
        let row = row_bytes(dtype, 1, latent_dim)?;
        let planes = split_layers(layers, num_blocks * block_size * row, |r| vec![r])?;
        let strides = Strides {
            block_size,
            num_blocks,
            block_stride: block_size * row,
            token_stride: row,
        };
        // SAFETY: forwarded from this function's contract.
        unsafe {
            KvLayout::from_raw(
                LayoutKind::Mla,
                dtype,
                KvKind::MlaLatent,
                1,
                latent_dim,
                strides,
                &planes,
            )
        }
    }

    /// SGLang's token-granular pools: per layer a K buffer and a V buffer `[num_tokens,
    /// heads, dim]` (`v` empty for an MLA pool `[num_tokens, 1, latent_dim]`). Slots are token
    /// indices; use [`BlockMap::Slots`].
    ///
    /// # Safety
    /// As [`KvLayout::from_raw`].
    pub unsafe fn token_pool(
        k: &[RawRegion],
        v: &[RawRegion],
        num_tokens: usize,
        heads: u32,
        dim: u32,
        dtype: Dtype,
    ) -> Result<KvLayout, LayoutError> {
        let row = row_bytes(dtype, heads, dim)?;
        let kv_kind = if v.is_empty() {
            KvKind::MlaLatent
        } else {
            KvKind::KeyValue
        };
        if !v.is_empty() && v.len() != k.len() {
            return Err(LayoutError::Shape(format!(
                "{} K buffers but {} V buffers",
                k.len(),
                v.len()
            )));
        }
        let planes: Vec<Vec<RawRegion>> = (0..k.len())
            .map(|i| {
                let mut p = vec![k[i]];
                if !v.is_empty() {
                    p.push(v[i]);
                }
                p
            })
            .collect();
        let strides = Strides {
            block_size: 1,
            num_blocks: num_tokens,
            block_stride: row,
            token_stride: row,
        };
        // SAFETY: forwarded from this function's contract.
        unsafe {
            KvLayout::from_raw(
                LayoutKind::TokenPool,
                dtype,
                kv_kind,
                heads,
                dim,
                strides,
                &planes,
            )
        }
    }

    pub fn kind(&self) -> LayoutKind {
        self.kind
    }
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    pub fn kv_kind(&self) -> KvKind {
        self.kv_kind
    }
    pub fn num_layers(&self) -> usize {
        self.bases.len()
    }
    pub fn planes(&self) -> usize {
        self.kv_kind.planes()
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    /// Bytes of one token of one plane: `heads * head_dim * dtype size`.
    pub fn row_bytes(&self) -> usize {
        self.heads as usize * self.head_dim as usize * self.dtype.size()
    }
    /// Whether the rows of one block are back to back (runs of tokens are one range).
    pub fn rows_contiguous(&self) -> bool {
        self.token_stride == self.row_bytes()
    }

    /// Address of slot `slot` (block * block_size + offset) of one plane of one layer.
    pub fn slot_addr(&self, layer: usize, plane: usize, slot: usize) -> usize {
        let (b, o) = (slot / self.block_size, slot % self.block_size);
        self.bases[layer][plane] + b * self.block_stride + o * self.token_stride
    }

    /// Checks the layout holds what `spec` describes.
    pub fn check_spec(&self, spec: &ModelSpec) -> Result<(), LayoutError> {
        let pairs: [(&'static str, String, String); 5] = [
            (
                "num_layers",
                self.num_layers().to_string(),
                spec.num_layers.to_string(),
            ),
            (
                "num_kv_heads",
                self.heads.to_string(),
                spec.num_kv_heads.to_string(),
            ),
            (
                "head_dim",
                self.head_dim.to_string(),
                spec.head_dim.to_string(),
            ),
            ("dtype", self.dtype.to_string(), spec.dtype.to_string()),
            (
                "kv_kind",
                self.kv_kind.name().into(),
                spec.kv_kind.name().into(),
            ),
        ];
        for (what, layout, spec) in pairs {
            if layout != spec {
                return Err(LayoutError::SpecMismatch { what, layout, spec });
            }
        }
        Ok(())
    }

    /// Checks that `map` sends every position of `positions` to a slot of this layout.
    pub fn check_map(
        &self,
        map: &BlockMap<'_>,
        positions: Range<usize>,
    ) -> Result<(), LayoutError> {
        match map {
            BlockMap::Blocks(table) => {
                let needed_blocks = positions.end.div_ceil(self.block_size);
                if table.len() < needed_blocks {
                    return Err(LayoutError::MapTooShort {
                        covered: table.len() * self.block_size,
                        needed: positions.end,
                    });
                }
                let first = positions.start / self.block_size;
                for (index, &block) in table.iter().enumerate().take(needed_blocks).skip(first) {
                    if block as usize >= self.num_blocks {
                        return Err(LayoutError::BlockOutOfRange {
                            index,
                            block,
                            num_blocks: self.num_blocks,
                        });
                    }
                }
            }
            BlockMap::Slots(slots) => {
                if slots.len() < positions.end {
                    return Err(LayoutError::MapTooShort {
                        covered: slots.len(),
                        needed: positions.end,
                    });
                }
                let num_slots = self.num_blocks * self.block_size;
                for position in positions {
                    let slot = slots[position];
                    if slot >= num_slots as i64 {
                        return Err(LayoutError::SlotOutOfRange {
                            position,
                            slot,
                            num_slots,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Appends the destination runs of token positions `positions` of one plane of one layer
    /// to `out`: maximal ranges of positions whose rows are back to back in memory. Padding
    /// slots (negative, in a slot mapping) are left out. `map` must have passed
    /// [`KvLayout::check_map`] for these positions.
    pub fn runs(
        &self,
        map: &BlockMap<'_>,
        layer: usize,
        plane: usize,
        positions: Range<usize>,
        out: &mut Vec<Run>,
    ) {
        let row = self.row_bytes();
        let contiguous = self.rows_contiguous();
        let push = |out: &mut Vec<Run>, addr: usize, pos: usize, tokens: usize| {
            if let Some(last) = out.last_mut()
                && contiguous
                && last.pos + last.tokens == pos
                && last.addr + last.tokens * row == addr
            {
                last.tokens += tokens;
                return;
            }
            out.push(Run { addr, pos, tokens });
        };
        match map {
            BlockMap::Blocks(table) => {
                let mut p = positions.start;
                while p < positions.end {
                    let off = p % self.block_size;
                    let n = if contiguous {
                        (self.block_size - off).min(positions.end - p)
                    } else {
                        1
                    };
                    let slot = table[p / self.block_size] as usize * self.block_size + off;
                    push(out, self.slot_addr(layer, plane, slot), p, n);
                    p += n;
                }
            }
            BlockMap::Slots(slots) => {
                for p in positions {
                    let slot = slots[p];
                    if slot >= 0 {
                        push(out, self.slot_addr(layer, plane, slot as usize), p, 1);
                    }
                }
            }
        }
    }
}

/// A run of token positions whose rows are contiguous in the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Address of the first row.
    pub addr: usize,
    /// First token position.
    pub pos: usize,
    /// Number of tokens (rows).
    pub tokens: usize,
}

/// Which slots hold which token positions of a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockMap<'a> {
    /// A block table: position `p` lives in block `table[p / block_size]`, slot
    /// `p % block_size` (vLLM).
    Blocks(&'a [u32]),
    /// A slot mapping: position `p` lives in slot `slots[p]` (`block * block_size + offset`,
    /// or a token index for token pools); negative slots are padding and skipped.
    Slots(&'a [i64]),
}

/// An owned [`BlockMap`], kept by a load that outlives the caller's borrow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OwnedMap {
    Blocks(Vec<u32>),
    Slots(Vec<i64>),
}

impl OwnedMap {
    pub(crate) fn of(map: &BlockMap<'_>) -> OwnedMap {
        match map {
            BlockMap::Blocks(t) => OwnedMap::Blocks(t.to_vec()),
            BlockMap::Slots(s) => OwnedMap::Slots(s.to_vec()),
        }
    }
    pub(crate) fn as_map(&self) -> BlockMap<'_> {
        match self {
            OwnedMap::Blocks(t) => BlockMap::Blocks(t),
            OwnedMap::Slots(s) => BlockMap::Slots(s),
        }
    }
}

fn row_bytes(dtype: Dtype, heads: u32, dim: u32) -> Result<usize, LayoutError> {
    if heads == 0 || dim == 0 {
        return Err(LayoutError::Shape(
            "heads and head_dim must be positive".into(),
        ));
    }
    Ok(heads as usize * dim as usize * dtype.size())
}

fn split_layers(
    layers: &[RawRegion],
    need: usize,
    split: impl Fn(RawRegion) -> Vec<RawRegion>,
) -> Result<Vec<Vec<RawRegion>>, LayoutError> {
    layers
        .iter()
        .map(|r| {
            if r.len < need {
                Err(LayoutError::RegionTooSmall { need, have: r.len })
            } else {
                Ok(split(*r))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flash_attn_addresses() {
        let mut mem = vec![0u8; 2 * 4 * 16 * 2 * 8 * 2];
        let r = RawRegion::of(&mut mem);
        // SAFETY: `mem` outlives the layout and nothing else touches it.
        let l = unsafe { KvLayout::vllm_flash_attn(&[r], 4, 16, 2, 8, Dtype::F16) }.unwrap();
        let base = r.ptr as usize;
        assert_eq!(l.slot_addr(0, 0, 0), base);
        assert_eq!(l.slot_addr(0, 0, 17), base + 16 * 32 + 32);
        assert_eq!(l.slot_addr(0, 1, 0), base + 4 * 16 * 32);
        let mut runs = Vec::new();
        l.runs(&BlockMap::Blocks(&[2, 3, 0]), 0, 0, 5..40, &mut runs);
        // blocks 2 and 3 are adjacent: positions 5..32 merge into one run
        assert_eq!(
            runs,
            vec![
                Run {
                    addr: base + 2 * 512 + 5 * 32,
                    pos: 5,
                    tokens: 27
                },
                Run {
                    addr: base,
                    pos: 32,
                    tokens: 8
                }
            ]
        );
    }

    #[test]
    fn flashinfer_interleaves_k_and_v() {
        let mut mem = vec![0u8; 3 * 2 * 4 * 64];
        let r = RawRegion::of(&mut mem);
        // SAFETY: `mem` outlives the layout and nothing else touches it.
        let l = unsafe { KvLayout::vllm_flashinfer(&[r], 3, 4, 1, 32, Dtype::F16) }.unwrap();
        let base = r.ptr as usize;
        assert_eq!(l.slot_addr(0, 1, 0), base + 256);
        assert_eq!(l.slot_addr(0, 0, 5), base + 512 + 64);
    }

    #[test]
    fn too_small_regions_and_bad_maps_are_refused() {
        let mut mem = vec![0u8; 1000];
        let r = RawRegion::of(&mut mem);
        // SAFETY: `mem` outlives the layout and nothing else touches it.
        let e = unsafe { KvLayout::vllm_flash_attn(&[r], 4, 16, 2, 8, Dtype::F16) }.unwrap_err();
        assert!(matches!(e, LayoutError::RegionTooSmall { .. }), "{e}");
        // SAFETY: as above.
        let l = unsafe { KvLayout::mla(&[r], 2, 4, 64, Dtype::Fp8E4m3) }.unwrap();
        assert!(matches!(
            l.check_map(&BlockMap::Blocks(&[0, 2]), 0..8),
            Err(LayoutError::BlockOutOfRange { block: 2, .. })
        ));
        assert!(matches!(
            l.check_map(&BlockMap::Blocks(&[0]), 0..8),
            Err(LayoutError::MapTooShort { .. })
        ));
        assert!(matches!(
            l.check_map(&BlockMap::Slots(&[0, 1, 8]), 0..3),
            Err(LayoutError::SlotOutOfRange { slot: 8, .. })
        ));
        l.check_map(&BlockMap::Slots(&[0, -1, 7]), 0..3).unwrap();
    }
}
