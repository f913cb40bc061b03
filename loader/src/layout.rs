//! Engine KV memory as the loader sees it: base addresses and strides, nothing more.
//!
//! Most engine layouts store one token's K (or V, or MLA latent) of one layer as a contiguous
//! `[heads, head_dim]` row; what differs is where the rows of a block live. So a [`KvLayout`]
//! is, per layer and plane (0 = K or latent, 1 = V), a base address, plus numbers shared by all
//! layers: `block_size` (tokens per block), `block_stride` (bytes between blocks) and, per
//! plane, [`PlaneStrides`]: bytes between the slots of a block (`token`), between the heads of
//! a slot (`head`) and between the elements of a head vector (`elem`). Element `e` of head `h`
//! of slot `s` is at
//! `base + (s / block_size) * block_stride + (s % block_size) * token + h * head + e * elem`;
//! a row is contiguous when `elem` is the dtype size and `head` one head vector:
//!
//! | engine layout (per layer)                        | planes' bases         | block_stride  |
//! |--------------------------------------------------|-----------------------|---------------|
//! | vLLM flash-attn `[2, blocks, bs, heads, dim]`    | `p`, `p + blocks*B`   | `B`           |
//! | vLLM flashinfer `[blocks, 2, bs, heads, dim]`    | `p`, `p + B`          | `2 * B`       |
//! | MLA `[blocks, bs, latent]`                       | `p`                   | `B`           |
//! | SGLang token pool `[tokens, heads, dim]` K and V | `k`, `v`              | `row`         |
//! | vLLM CPU `[blocks, heads, bs, 2 * dim]`          | `p`, `p + bs*D`       | `B`           |
//!
//! where `row = heads * dim * dtype size`, `D = dim * dtype size` and `B = bs * row`; SGLang's
//! pools are block size 1. vLLM's CPU attention kernel (`cpu_attn_reshape_and_cache`) keeps,
//! per block and head, the block's K transposed (`[dim, bs]`: element `e` of token `t` at
//! `e * bs + t`), then its V as rows (`[bs, dim]`); python/tests checks this against the kernel.
//! Its K plane is `token = esz, head = 2 * bs * D, elem = bs * esz`, its V plane
//! `token = D, head = 2 * bs * D, elem = esz`. Rows that are not contiguous are copied piece
//! by piece ([`KvLayout::pieces`]), or by a strided loop on host memory
//! ([`crate::backend::HostMemory`]).
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
    VllmCpu,
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
    /// Per plane: where a slot's values live inside a block.
    strides: [PlaneStrides; 2],
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

/// Where one plane's values live inside a block, in bytes: between the slots of the block
/// (`token`), the heads of a slot (`head`) and the elements of a head vector (`elem`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlaneStrides {
    pub token: usize,
    pub head: usize,
    pub elem: usize,
}

impl PlaneStrides {
    /// Contiguous `[heads, head_dim]` rows, `token` bytes apart.
    pub fn rows(token: usize, dtype: Dtype, head_dim: u32) -> PlaneStrides {
        PlaneStrides {
            token,
            head: head_dim as usize * dtype.size(),
            elem: dtype.size(),
        }
    }
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
        if strides.token_stride < row {
            return Err(LayoutError::Shape(format!(
                "token stride {} is below one token row ({row} bytes)",
                strides.token_stride
            )));
        }
        let plane = PlaneStrides::rows(strides.token_stride, dtype, head_dim);
        // SAFETY: forwarded from this function's contract.
        unsafe {
            KvLayout::from_raw_strided(
                kind,
                dtype,
                kv_kind,
                heads,
                head_dim,
                Strides {
                    token_stride: 0,
                    ..strides
                },
                &[plane; 2][..kv_kind.planes()],
                planes,
            )
        }
    }

    /// A layout whose planes place slots, heads and elements anywhere inside a block
    /// (`plane_strides`: one per plane; `strides.token_stride` is unused). Refuses strides
    /// under which two values of a block would overlap.
    ///
    /// # Safety
    /// As [`KvLayout::from_raw`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn from_raw_strided(
        kind: LayoutKind,
        dtype: Dtype,
        kv_kind: KvKind,
        heads: u32,
        head_dim: u32,
        strides: Strides,
        plane_strides: &[PlaneStrides],
        planes: &[Vec<RawRegion>],
    ) -> Result<KvLayout, LayoutError> {
        row_bytes(dtype, heads, head_dim)?;
        let Strides {
            block_size,
            num_blocks,
            block_stride,
            ..
        } = strides;
        if block_size == 0 || num_blocks == 0 {
            return Err(LayoutError::Shape(
                "block size and block count must be positive".into(),
            ));
        }
        if kv_kind == KvKind::MlaLatent && heads != 1 {
            return Err(LayoutError::Shape("an MLA latent has one head".into()));
        }
        if plane_strides.len() != kv_kind.planes() {
            return Err(LayoutError::Shape(format!(
                "{} plane strides, {} needs {}",
                plane_strides.len(),
                kv_kind.name(),
                kv_kind.planes()
            )));
        }
        if planes.is_empty() {
            return Err(LayoutError::Shape("no layers".into()));
        }
        // Bytes each plane's region must hold from its base: the highest byte any value of
        // any slot touches.
        let mut need = [0usize; 2];
        for (i, ps) in plane_strides.iter().enumerate() {
            let span = block_span(dtype, heads, head_dim, block_size, ps)
                .map_err(|e| LayoutError::Shape(format!("plane {i}: {e}")))?;
            if num_blocks > 1 && block_stride < span {
                return Err(LayoutError::Shape(format!(
                    "plane {i}: block stride {block_stride} is below a block's {span} bytes"
                )));
            }
            need[i] = (num_blocks - 1)
                .checked_mul(block_stride)
                .and_then(|v| v.checked_add(span))
                .ok_or_else(|| LayoutError::Shape("shape overflows".into()))?;
        }
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
                if r.len < need[i] {
                    return Err(LayoutError::RegionTooSmall {
                        need: need[i],
                        have: r.len,
                    });
                }
                b[i] = r.ptr as usize;
            }
            bases.push(b);
        }
        let first = plane_strides[0];
        Ok(KvLayout {
            kind,
            dtype,
            kv_kind,
            heads,
            head_dim,
            block_size,
            num_blocks,
            block_stride,
            strides: [first, *plane_strides.get(1).unwrap_or(&first)],
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

    /// vLLM's CPU attention back end: per layer one tensor `[num_blocks, num_kv_heads,
    /// block_size, 2 * head_size]`; per block and head, K transposed (`[head_size,
    /// block_size]`), then V as rows (`[block_size, head_size]`), as its kernel
    /// `cpu_attn_reshape_and_cache` writes them.
    ///
    /// # Safety
    /// As [`KvLayout::from_raw`].
    pub unsafe fn vllm_cpu(
        layers: &[RawRegion],
        num_blocks: usize,
        block_size: usize,
        num_kv_heads: u32,
        head_size: u32,
        dtype: Dtype,
    ) -> Result<KvLayout, LayoutError> {
        let esz = dtype.size();
        let d = row_bytes(dtype, 1, head_size)?;
        let head = 2 * block_size * d;
        let block = num_kv_heads as usize * head;
        let total = num_blocks * block;
        let half = block_size * d;
        let planes = split_layers(layers, total, |r| {
            vec![
                RawRegion::new(r.ptr, total),
                // wrapping: no dereference, and the length check above keeps it in bounds
                RawRegion::new(r.ptr.wrapping_add(half), total - half),
            ]
        })?;
        let k = PlaneStrides {
            token: esz,
            head,
            elem: block_size * esz,
        };
        let v = PlaneStrides {
            token: d,
            head,
            elem: esz,
        };
        let strides = Strides {
            block_size,
            num_blocks,
            block_stride: block,
            token_stride: 0,
        };
        // SAFETY: forwarded from this function's contract.
        unsafe {
            KvLayout::from_raw_strided(
                LayoutKind::VllmCpu,
                dtype,
                KvKind::KeyValue,
                num_kv_heads,
                head_size,
                strides,
                &[k, v],
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
    /// Bytes of one head vector: `head_dim * dtype size`.
    pub fn head_bytes(&self) -> usize {
        self.head_dim as usize * self.dtype.size()
    }
    /// Where `plane`'s values live inside a block.
    pub fn plane_strides(&self, plane: usize) -> PlaneStrides {
        self.strides[plane]
    }
    /// Whether one slot's `[heads, head_dim]` row of `plane` is one contiguous range.
    pub fn row_contiguous(&self, plane: usize) -> bool {
        let s = self.strides[plane];
        s.elem == self.dtype.size() && (self.heads == 1 || s.head == self.head_bytes())
    }
    /// Whether the rows of one block of `plane` are back to back (runs of tokens are one
    /// range).
    pub fn rows_contiguous(&self, plane: usize) -> bool {
        self.row_contiguous(plane) && self.strides[plane].token == self.row_bytes()
    }

    /// Address of slot `slot` (block * block_size + offset) of one plane of one layer: where
    /// its first element (head 0, element 0) lives.
    pub fn slot_addr(&self, layer: usize, plane: usize, slot: usize) -> usize {
        let (b, o) = (slot / self.block_size, slot % self.block_size);
        self.bases[layer][plane] + b * self.block_stride + o * self.strides[plane].token
    }

    /// The contiguous pieces of engine memory that hold `run`'s rows of `plane`, as
    /// (address, offset in the run's rows packed back to back, length): one piece when the
    /// rows are contiguous, else one per token and head, or per element when a head vector is
    /// strided.
    pub fn pieces(&self, plane: usize, run: &Run) -> Pieces {
        let s = self.strides[plane];
        let esz = self.dtype.size();
        let (heads, elems, len) = if self.row_contiguous(plane) {
            // `runs` merges only tokens whose rows are back to back.
            (1, 1, run.tokens * self.row_bytes())
        } else if s.elem == esz {
            (self.heads as usize, 1, self.head_bytes())
        } else {
            (self.heads as usize, self.head_dim as usize, esz)
        };
        let tokens = if heads == 1 && elems == 1 {
            1
        } else {
            run.tokens
        };
        Pieces {
            addr: run.addr,
            strides: s,
            row: self.row_bytes(),
            head_bytes: self.head_bytes(),
            heads,
            elems,
            len,
            count: tokens * heads * elems,
            next: 0,
        }
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
    ///
    /// A plane whose single row is itself scattered (not [`KvLayout::row_contiguous`]: vLLM
    /// CPU's transposed K, or heads apart) is copied piece by piece anyway, so its runs are
    /// maximal ranges of consecutive slots instead (row `t` of a run at `addr + t * token`
    /// stride): the back end then moves a whole block of such a plane in one call (a tiled
    /// transpose for vLLM CPU's K) rather than one call per token.
    pub fn runs(
        &self,
        map: &BlockMap<'_>,
        layer: usize,
        plane: usize,
        positions: Range<usize>,
        out: &mut Vec<Run>,
    ) {
        // Back-to-back rows have token stride == row bytes, so one rule covers both cases.
        let step = self.strides[plane].token;
        let contiguous = self.rows_contiguous(plane) || !self.row_contiguous(plane);
        let push = |out: &mut Vec<Run>, addr: usize, pos: usize, tokens: usize| {
            if let Some(last) = out.last_mut()
                && contiguous
                && last.pos + last.tokens == pos
                && last.addr + last.tokens * step == addr
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

/// The pieces of one [`Run`]; see [`KvLayout::pieces`].
#[derive(Debug, Clone)]
pub struct Pieces {
    addr: usize,
    strides: PlaneStrides,
    row: usize,
    head_bytes: usize,
    heads: usize,
    elems: usize,
    len: usize,
    count: usize,
    next: usize,
}

impl Iterator for Pieces {
    /// (destination address, offset in the packed rows, length)
    type Item = (usize, usize, usize);

    fn next(&mut self) -> Option<Self::Item> {
        if self.next == self.count {
            return None;
        }
        let i = self.next;
        self.next += 1;
        let (e, rest) = (i % self.elems, i / self.elems);
        let (h, t) = (rest % self.heads, rest / self.heads);
        let s = self.strides;
        Some((
            self.addr + t * s.token + h * s.head + e * s.elem,
            t * self.row + h * self.head_bytes + e * self.len,
            self.len,
        ))
    }
}

/// Bytes one block of a plane spans (from its first to past its last value), refusing strides
/// under which two values would overlap: sorted by stride, each dimension must step past
/// everything the smaller ones span.
fn block_span(
    dtype: Dtype,
    heads: u32,
    head_dim: u32,
    block_size: usize,
    s: &PlaneStrides,
) -> Result<usize, String> {
    let mut dims = [
        (s.elem, head_dim as usize, "element"),
        (s.head, heads as usize, "head"),
        (s.token, block_size, "token"),
    ];
    dims.sort_by_key(|d| d.0);
    let mut span = dtype.size();
    for (stride, n, what) in dims {
        if n <= 1 {
            continue;
        }
        if stride < span {
            return Err(format!(
                "{what} stride {stride} is below the {span} bytes the smaller dimensions span"
            ));
        }
        span = stride
            .checked_mul(n - 1)
            .and_then(|v| v.checked_add(span))
            .ok_or("shape overflows")?;
    }
    Ok(span)
}

/// A run of token positions whose rows are contiguous in the destination, or, for a plane
/// whose rows are scattered, whose slots are consecutive (see [`KvLayout::runs`]): row `t` of
/// the run starts at `addr + t * token stride` either way.
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
    fn vllm_cpu_keeps_k_transposed_and_v_as_rows() {
        // [blocks 3, heads 2, block_size 4, 2 * head 8] in bf16: D = 16 bytes.
        let (nb, h, bs, dim, esz) = (3usize, 2usize, 4usize, 8usize, 2usize);
        let d = dim * esz;
        let mut mem = vec![0u8; nb * h * bs * 2 * d];
        let r = RawRegion::of(&mut mem);
        // SAFETY: `mem` outlives the layout and nothing else touches it.
        let l = unsafe { KvLayout::vllm_cpu(&[r], nb, bs, 2, 8, Dtype::Bf16) }.unwrap();
        let base = r.ptr as usize;
        assert_eq!(l.kind(), LayoutKind::VllmCpu);
        assert!(!l.row_contiguous(0) && !l.row_contiguous(1));
        let block = h * 2 * bs * d;
        // slot 5 = block 1, token 1: K element 0 of head 0 is the block's second value
        assert_eq!(l.slot_addr(0, 0, 5), base + block + esz);
        // V rows follow the head's transposed K
        assert_eq!(l.slot_addr(0, 1, 5), base + block + bs * d + d);
        let mut runs = Vec::new();
        l.runs(&BlockMap::Blocks(&[2, 1]), 0, 0, 3..5, &mut runs);
        assert_eq!(runs.len(), 2, "slots of different blocks are separate runs");
        // K of position 4 (block 1, slot 0): element e of head h at h * 2*bs*D + e * bs * esz
        let pieces: Vec<_> = l.pieces(0, &runs[1]).collect();
        assert_eq!(pieces.len(), h * dim);
        assert_eq!(pieces[1], (base + block + bs * esz, esz, esz));
        assert_eq!(pieces[dim], (base + block + 2 * bs * d, d, esz));
        // V of position 4: one piece per head
        runs.clear();
        l.runs(&BlockMap::Blocks(&[2, 1]), 0, 1, 3..5, &mut runs);
        let pieces: Vec<_> = l.pieces(1, &runs[1]).collect();
        assert_eq!(
            pieces,
            vec![
                (base + block + bs * d, 0, d),
                (base + block + bs * d + 2 * bs * d, d, d)
            ]
        );
        // the consecutive slots of one block are one run of each plane, whose rows step by
        // the plane's token stride
        for plane in 0..2 {
            runs.clear();
            l.runs(&BlockMap::Blocks(&[2, 1]), 0, plane, 4..7, &mut runs);
            assert_eq!(
                runs,
                vec![Run {
                    addr: l.slot_addr(0, plane, 4),
                    pos: 4,
                    tokens: 3
                }]
            );
            let pieces: Vec<_> = l.pieces(plane, &runs[0]).collect();
            assert_eq!(pieces.len(), 3 * h * if plane == 0 { dim } else { 1 });
            // token 2 of the run, head 1: slot 6 = block 1, token 2
            let (per_token, i) = if plane == 0 {
                (h * dim, 2 * h * dim + dim)
            } else {
                (h, 5)
            };
            assert_eq!(pieces.len() / 3, per_token);
            assert_eq!(pieces[i].0, l.slot_addr(0, plane, 6) + 2 * bs * d);
        }
        // one byte short is refused
        let short = RawRegion::new(r.ptr, mem.len() - 1);
        // SAFETY: as above.
        let e = unsafe { KvLayout::vllm_cpu(&[short], nb, bs, 2, 8, Dtype::Bf16) }.unwrap_err();
        assert!(matches!(e, LayoutError::RegionTooSmall { .. }), "{e}");
    }

    #[test]
    fn overlapping_strides_are_refused() {
        let mut mem = vec![0u8; 1 << 16];
        let r = RawRegion::of(&mut mem);
        let strides = Strides {
            block_size: 4,
            num_blocks: 2,
            block_stride: 4096,
            token_stride: 0,
        };
        let make = |ps: PlaneStrides, block_stride: usize| {
            // SAFETY: `mem` outlives the layouts and nothing else touches it.
            unsafe {
                KvLayout::from_raw_strided(
                    LayoutKind::Custom,
                    Dtype::F16,
                    KvKind::MlaLatent,
                    1,
                    8,
                    Strides {
                        block_stride,
                        ..strides
                    },
                    &[ps],
                    &[vec![r]],
                )
            }
        };
        // elements 2 bytes apart, tokens 16 apart: fine; tokens 8 apart overlap elements
        let ok = PlaneStrides {
            token: 16,
            head: 16,
            elem: 2,
        };
        make(ok, 4096).unwrap();
        let e = make(PlaneStrides { token: 8, ..ok }, 4096).unwrap_err();
        assert!(matches!(e, LayoutError::Shape(_)), "{e}");
        // transposed (elements 8 apart, tokens 2 apart): fine
        make(
            PlaneStrides {
                token: 2,
                head: 64,
                elem: 8,
            },
            4096,
        )
        .unwrap();
        // a block stride inside the previous block
        let e = make(ok, 32).unwrap_err();
        assert!(matches!(e, LayoutError::Shape(_)), "{e}");
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
