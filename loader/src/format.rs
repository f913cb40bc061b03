//! The `.kvc` chunk file: one chunk of KV cache, self-describing and verifiable.
//!
//! Byte-exact specification: `docs/FORMAT.md`. In short:
//!
//! ```text
//! [ header: fixed 248 bytes | token ids | layer table | zero padding ]  header_len, 4096-aligned
//! [ layer 0: plane 0 extent | pad | plane 1 extent | pad ]              every extent 4096-aligned
//! [ layer 1: ... ]
//! ...                                                                   file_len, 4096-aligned
//! ```
//!
//! Planes are K and V (or one MLA latent). Each extent is `[tokens, heads, head_dim]`,
//! token-major, so a run of tokens (one ContiguousKV group) is one contiguous range, and each
//! extent starts on a 4096-byte boundary so a layer or a group is one aligned read, fit for
//! O_DIRECT and cuFile.
//!
//! Integrity has two levels, so hot paths can choose their cost:
//! - the **header** carries a blake3 checksum of itself and is always checked, together with
//!   every derived quantity (extents, sizes, the key recomputed from namespace, parent, salt
//!   tag and tokens). That is a few microseconds.
//! - the **payload** carries one blake3 digest per layer (over that layer's extents) and a
//!   payload digest over the list of layer digests. Checking it costs a pass over the bytes;
//!   the store does it whenever bytes enter a tier, and per layer lets a layer-wise loader
//!   check exactly what it read.

use crate::error::FormatError;
use crate::importance::{self, Importance, MAX_IMPORTANCE_LEN};
use crate::key::{ChunkKey, SaltTag};
use crate::spec::{Dtype, KvKind, ModelSpec, NamespaceId};
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;

/// First 8 bytes of every chunk file.
pub const MAGIC: [u8; 8] = *b"KVFSCHNK";
/// Newest format version this build writes and reads. A chunk that uses no version-2 feature
/// (position independence, importance) is still written as [`VERSION_1`], so caches, keys and
/// golden bytes of version 1 stay valid.
pub const VERSION: u16 = 2;
/// The first format version: prefix-chained chunks only.
pub const VERSION_1: u16 = 1;
/// Alignment of the header end, of every extent and of the file end: the O_DIRECT and cuFile
/// granularity on every NVMe device and file system kvfs targets.
pub const ALIGN: u64 = 4096;
/// Size of the fixed part of the header.
pub const FIXED_HEADER_LEN: usize = 248;
/// Upper bound on tokens in one chunk, so a corrupt count cannot ask for gigabytes of header.
pub const MAX_CHUNK_TOKENS: u32 = 1 << 20;
/// Upper bound on layers (the largest models have ~130).
pub const MAX_LAYERS: u32 = 4096;
/// Upper bound on `header_len`: the header of a chunk with [`MAX_CHUNK_TOKENS`] tokens and
/// [`MAX_LAYERS`] K/V layers. A reader checks a file's `header_len` against it before it
/// allocates the header, so a corrupt or hostile length cannot ask for gigabytes.
pub const MAX_HEADER_LEN: u64 = align_up(
    align_up(FIXED_HEADER_LEN as u64 + 4 * MAX_CHUNK_TOKENS as u64, 8)
        + MAX_LAYERS as u64 * (2 * 16 + 32)
        + MAX_LAYERS as u64 * 32
        + 4 * crate::codec::stored::MAX_GROUP_ENTRIES
        + MAX_IMPORTANCE_LEN,
    ALIGN,
);

const FLAG_HAS_PARENT: u32 = 1;
/// Version 2: a position-independent chunk (no parent, its own key derivation); the u32 at
/// offset 44 is its original start position.
pub const FLAG_INDEPENDENT: u32 = 1 << 1;
/// Flag bit 2 (format version 2): the header carries an importance section after the layer
/// table ([`crate::importance`]).
pub const FLAG_IMPORTANCE: u32 = 1 << 2;
/// Flag bits this build knows, per version.
const FLAGS_V1: u32 = FLAG_HAS_PARENT;
const FLAGS_V2: u32 = FLAG_HAS_PARENT | FLAG_INDEPENDENT | FLAG_IMPORTANCE;
const PAYLOAD_CONTEXT: &str = "kvfs 2026-11 payload v1";

// Offsets of the fixed header fields (see docs/FORMAT.md).
const OFF_VERSION: usize = 8;
const OFF_KV_KIND: usize = 10;
const OFF_DTYPE: usize = 11;
const OFF_HEADER_LEN: usize = 12;
const OFF_FLAGS: usize = 16;
const OFF_CODEC: usize = 20;
const OFF_LAYERS: usize = 24;
const OFF_HEADS: usize = 28;
const OFF_HEAD_DIM: usize = 32;
const OFF_TOKENS: usize = 36;
const OFF_GROUP: usize = 40;
/// Reserved (zero) in version 1; in version 2 the original start position of an independent
/// chunk (zero for other chunks).
const OFF_ORIGIN: usize = 44;
const OFF_FILE_LEN: usize = 48;
const OFF_NAMESPACE: usize = 56;
const OFF_KEY: usize = 88;
const OFF_PARENT: usize = 120;
const OFF_SALT: usize = 152;
const OFF_PAYLOAD_DIGEST: usize = 184;
const OFF_HEADER_CHECKSUM: usize = 216;

pub use crate::codec::Codec;
use crate::codec::stored::StoredTable;
use std::sync::Arc;

/// Identity and shape of one chunk: everything in the header except what is derived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkMeta {
    pub namespace: NamespaceId,
    pub key: ChunkKey,
    pub parent: Option<ChunkKey>,
    pub salt: SaltTag,
    pub dtype: Dtype,
    pub kv_kind: KvKind,
    pub num_layers: u32,
    pub num_heads: u32,
    pub head_dim: u32,
    pub group_tokens: u32,
    pub tokens: Vec<u32>,
    /// `Some(p)`: a position-independent chunk (format v2, [`FLAG_INDEPENDENT`]) whose KV was
    /// computed at positions `p..p + tokens.len()`; its key has no parent
    /// ([`ChunkKey::derive_independent`]). `None`: a prefix-chained chunk.
    pub origin: Option<u32>,
}

impl ChunkMeta {
    /// Meta of the chunk holding `tokens` after `parent` under `spec`, with its key derived.
    pub fn for_spec(
        spec: &ModelSpec,
        parent: Option<ChunkKey>,
        salt: SaltTag,
        tokens: Vec<u32>,
    ) -> ChunkMeta {
        let namespace = spec.namespace_id();
        let key = ChunkKey::derive(&namespace, parent.as_ref(), &salt, &tokens);
        ChunkMeta {
            namespace,
            key,
            parent,
            salt,
            dtype: spec.dtype,
            kv_kind: spec.kv_kind,
            num_layers: spec.num_layers,
            num_heads: spec.num_kv_heads,
            head_dim: spec.head_dim,
            group_tokens: spec.group_tokens,
            tokens,
            origin: None,
        }
    }

    /// Meta of a position-independent chunk holding `tokens`, computed at positions
    /// `origin..`, under `spec`, with its key derived.
    pub fn independent(
        spec: &ModelSpec,
        salt: SaltTag,
        tokens: Vec<u32>,
        origin: u32,
    ) -> ChunkMeta {
        let mut meta = ChunkMeta::for_spec(spec, None, salt, tokens);
        meta.origin = Some(origin);
        meta.key = meta.computed_key();
        meta
    }

    /// The key these fields imply.
    pub fn computed_key(&self) -> ChunkKey {
        if self.origin.is_some() {
            return ChunkKey::derive_independent(&self.namespace, &self.salt, &self.tokens);
        }
        ChunkKey::derive(
            &self.namespace,
            self.parent.as_ref(),
            &self.salt,
            &self.tokens,
        )
    }

    /// The format version this chunk is written in: 1 unless it uses a version-2 feature.
    pub fn version(&self) -> u16 {
        if self.origin.is_some() {
            VERSION
        } else {
            VERSION_1
        }
    }

    /// The format version of this chunk stored with `codec` (a codec other than raw is a
    /// version-2 feature).
    pub fn version_with(&self, codec: Codec) -> u16 {
        if codec == Codec::Raw {
            self.version()
        } else {
            VERSION
        }
    }

    pub fn geometry(&self) -> Result<Geometry, FormatError> {
        Geometry::new(self)
    }

    fn validate(&self) -> Result<(), FormatError> {
        if self.num_layers == 0 || self.num_layers > MAX_LAYERS {
            return Err(FormatError::field(
                "num_layers",
                format!("{} is outside 1..={MAX_LAYERS}", self.num_layers),
            ));
        }
        if self.num_heads == 0 {
            return Err(FormatError::field("num_heads", "must be positive"));
        }
        if self.kv_kind == KvKind::MlaLatent && self.num_heads != 1 {
            return Err(FormatError::field(
                "num_heads",
                "an MLA latent has one head",
            ));
        }
        if self.head_dim == 0 {
            return Err(FormatError::field("head_dim", "must be positive"));
        }
        if self.tokens.is_empty() || self.tokens.len() as u64 > MAX_CHUNK_TOKENS as u64 {
            return Err(FormatError::field(
                "token_count",
                format!("{} is outside 1..={MAX_CHUNK_TOKENS}", self.tokens.len()),
            ));
        }
        if self.group_tokens == 0 {
            return Err(FormatError::field("group_tokens", "must be positive"));
        }
        if self.origin.is_some() && self.parent.is_some() {
            return Err(FormatError::field(
                "flags",
                "an independent chunk has no parent",
            ));
        }
        Ok(())
    }
}

/// Where everything lives in a chunk file; derived from the meta alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub num_layers: u32,
    pub planes: u32,
    pub token_count: u32,
    pub group_tokens: u32,
    /// Bytes of one token in one plane: `heads * head_dim * dtype size`.
    pub token_bytes: u64,
    /// Bytes of one plane extent: `token_count * token_bytes`.
    pub extent_len: u64,
    /// Distance between the starts of two consecutive extents (`extent_len` rounded up).
    pub extent_stride: u64,
    /// Where the layer table starts inside the header.
    pub table_offset: u64,
    /// Length of the importance section (0: no section). It follows the last table of the
    /// header: the layer table of a raw chunk, the codec table of a coded one
    /// ([`crate::codec::stored`]); readers and writers walk the header to it.
    pub importance_len: u64,
    /// Header length, 4096-aligned; the first extent starts here.
    pub header_len: u64,
    /// Total file length, 4096-aligned.
    pub file_len: u64,
}

pub(crate) const fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Geometry {
    fn new(meta: &ChunkMeta) -> Result<Geometry, FormatError> {
        Geometry::with_importance(meta, false)
    }

    /// The geometry of `meta`'s chunk with (`true`) or without an importance section.
    pub fn with_importance(meta: &ChunkMeta, importance: bool) -> Result<Geometry, FormatError> {
        meta.validate()?;
        let planes = meta.kv_kind.planes() as u64;
        let token_bytes = (meta.num_heads as u64)
            .checked_mul(meta.head_dim as u64)
            .and_then(|v| v.checked_mul(meta.dtype.size() as u64))
            .ok_or_else(|| FormatError::field("head_dim", "shape overflows"))?;
        let extent_len = token_bytes
            .checked_mul(meta.tokens.len() as u64)
            .ok_or_else(|| FormatError::field("token_count", "shape overflows"))?;
        let extent_stride = align_up(extent_len, ALIGN);
        let table_offset = align_up(FIXED_HEADER_LEN as u64 + 4 * meta.tokens.len() as u64, 8);
        let table_len = meta.num_layers as u64 * (planes * 16 + 32);
        let importance_offset = table_offset + table_len;
        let importance_len = if importance {
            importance::section_len(
                meta.num_layers,
                meta.tokens.len().div_ceil(meta.group_tokens as usize) as u32,
            )
        } else {
            0
        };
        let header_len = align_up(importance_offset + importance_len, ALIGN);
        let payload = extent_stride
            .checked_mul(planes * meta.num_layers as u64)
            .ok_or_else(|| FormatError::field("num_layers", "shape overflows"))?;
        let file_len = header_len
            .checked_add(payload)
            .filter(|v| *v < (1u64 << 48))
            .ok_or_else(|| FormatError::field("file_len", "chunk would exceed 256 TiB"))?;
        Ok(Geometry {
            num_layers: meta.num_layers,
            planes: planes as u32,
            token_count: meta.tokens.len() as u32,
            group_tokens: meta.group_tokens,
            token_bytes,
            extent_len,
            extent_stride,
            table_offset,
            importance_len,
            header_len,
            file_len,
        })
    }

    /// Byte range of one plane (0 = K or latent, 1 = V) of one layer within the file.
    pub fn extent(&self, layer: u32, plane: u32) -> Range<u64> {
        assert!(
            layer < self.num_layers && plane < self.planes,
            "extent ({layer}, {plane}) out of range"
        );
        let start = self.header_len
            + (layer as u64 * self.planes as u64 + plane as u64) * self.extent_stride;
        start..start + self.extent_len
    }

    /// Byte range of all planes of one layer, padding included: one read for layer-wise loading.
    pub fn layer_span(&self, layer: u32) -> Range<u64> {
        let start = self.extent(layer, 0).start;
        start..start + self.planes as u64 * self.extent_stride
    }

    /// Number of groups (the last one may be short).
    pub fn groups(&self) -> u32 {
        self.token_count.div_ceil(self.group_tokens)
    }

    /// Byte range of tokens `[t0, t1)` of one plane of one layer.
    pub fn token_range(&self, layer: u32, plane: u32, tokens: Range<u32>) -> Range<u64> {
        assert!(
            tokens.start <= tokens.end && tokens.end <= self.token_count,
            "token range out of chunk"
        );
        let e = self.extent(layer, plane);
        e.start + tokens.start as u64 * self.token_bytes
            ..e.start + tokens.end as u64 * self.token_bytes
    }

    /// Token range of group `g`.
    pub fn group_tokens_range(&self, g: u32) -> Range<u32> {
        let start = g * self.group_tokens;
        start..(start + self.group_tokens).min(self.token_count)
    }

    /// Payload bytes (file length without header).
    pub fn payload_len(&self) -> u64 {
        self.file_len - self.header_len
    }
}

/// A parsed, checked header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHeader {
    /// [`VERSION_1`], or [`VERSION`] when a version-2 feature is used.
    pub version: u16,
    pub meta: ChunkMeta,
    pub geometry: Geometry,
    pub codec: Codec,
    /// Where a coded chunk's groups are (None for raw chunks, whose layout is `geometry`).
    pub stored: Option<Arc<StoredTable>>,
    /// blake3 of each layer's extents (stored bytes for a coded chunk), in order.
    pub layer_digests: Vec<[u8; 32]>,
    /// Digest over all layer digests: one number for the whole payload.
    pub payload_digest: [u8; 32],
    /// Per layer and group, the attention mass the groups received (flag bit 2).
    pub importance: Option<Importance>,
}

pub(crate) fn le_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
pub(crate) fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
pub(crate) fn le_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}
fn arr32(b: &[u8], off: usize) -> [u8; 32] {
    b[off..off + 32].try_into().unwrap()
}

/// Digest of one layer's extents, given as the plane slices in order.
pub fn layer_digest(planes: &[&[u8]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for p in planes {
        h.update(p);
    }
    *h.finalize().as_bytes()
}

fn payload_digest_of(layer_digests: &[[u8; 32]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(PAYLOAD_CONTEXT);
    for d in layer_digests {
        h.update(d);
    }
    *h.finalize().as_bytes()
}

fn header_checksum(header: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&header[..OFF_HEADER_CHECKSUM]);
    h.update(&[0u8; 32]);
    h.update(&header[OFF_HEADER_CHECKSUM + 32..]);
    *h.finalize().as_bytes()
}

impl ChunkHeader {
    /// Length of the header that starts with `prefix` (at least [`FIXED_HEADER_LEN`] bytes),
    /// after checking magic and version: how much to read before [`ChunkHeader::parse`].
    pub fn peek_header_len(prefix: &[u8]) -> Result<u64, FormatError> {
        if prefix.len() < FIXED_HEADER_LEN {
            return Err(FormatError::Truncated {
                needed: FIXED_HEADER_LEN as u64,
                have: prefix.len() as u64,
            });
        }
        if prefix[..8] != MAGIC {
            return Err(FormatError::BadMagic {
                found: prefix[..8].try_into().unwrap(),
            });
        }
        let version = le_u16(prefix, OFF_VERSION);
        if !(VERSION_1..=VERSION).contains(&version) {
            return Err(FormatError::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        let header_len = le_u32(prefix, OFF_HEADER_LEN) as u64;
        if header_len < ALIGN || header_len % ALIGN != 0 {
            return Err(FormatError::field(
                "header_len",
                format!("{header_len} is not a positive multiple of {ALIGN}"),
            ));
        }
        if header_len > MAX_HEADER_LEN {
            return Err(FormatError::field(
                "header_len",
                format!("{header_len} is more than any chunk needs ({MAX_HEADER_LEN})"),
            ));
        }
        Ok(header_len)
    }

    /// Parses and checks a header from the start of a chunk file. `bytes` must hold at least
    /// the header; the payload is not looked at (see [`ChunkHeader::verify_payload`]).
    pub fn parse(bytes: &[u8]) -> Result<ChunkHeader, FormatError> {
        let header_len = Self::peek_header_len(bytes)?;
        if (bytes.len() as u64) < header_len {
            return Err(FormatError::Truncated {
                needed: header_len,
                have: bytes.len() as u64,
            });
        }
        let h = &bytes[..header_len as usize];
        if arr32(h, OFF_HEADER_CHECKSUM) != header_checksum(h) {
            return Err(FormatError::HeaderChecksum);
        }
        // From here on the header is what its writer wrote: every check below catches a
        // writer bug or a deliberate forgery, not bit rot.
        let kv_kind = KvKind::from_u8(h[OFF_KV_KIND]).ok_or_else(|| {
            FormatError::field("kv_kind", format!("unknown value {}", h[OFF_KV_KIND]))
        })?;
        let dtype = Dtype::from_u8(h[OFF_DTYPE]).ok_or_else(|| {
            FormatError::field("dtype", format!("unknown value {}", h[OFF_DTYPE]))
        })?;
        let version = le_u16(h, OFF_VERSION);
        let flags = le_u32(h, OFF_FLAGS);
        let known = if version == VERSION_1 {
            FLAGS_V1
        } else {
            FLAGS_V2
        };
        if flags & !known != 0 {
            return Err(FormatError::field(
                "flags",
                format!("unknown bits {flags:#x} for version {version}"),
            ));
        }
        if flags & FLAG_INDEPENDENT != 0 && flags & FLAG_HAS_PARENT != 0 {
            return Err(FormatError::field(
                "flags",
                "an independent chunk has no parent",
            ));
        }
        let codec = Codec::from_u8(h[OFF_CODEC]).ok_or(FormatError::UnknownCodec {
            value: h[OFF_CODEC],
        })?;
        if codec != Codec::Raw && version < 2 {
            return Err(FormatError::field(
                "codec",
                format!("{codec} needs format version 2, the file says {version}"),
            ));
        }
        let origin = (flags & FLAG_INDEPENDENT != 0).then(|| le_u32(h, OFF_ORIGIN));
        if h[OFF_CODEC + 1..OFF_LAYERS] != [0, 0, 0]
            || (origin.is_none() && le_u32(h, OFF_ORIGIN) != 0)
        {
            return Err(FormatError::field("reserved", "must be zero"));
        }
        let token_count = le_u32(h, OFF_TOKENS);
        if token_count == 0 || token_count > MAX_CHUNK_TOKENS {
            return Err(FormatError::field(
                "token_count",
                format!("{token_count} is outside 1..={MAX_CHUNK_TOKENS}"),
            ));
        }
        let tokens_end = FIXED_HEADER_LEN as u64 + 4 * token_count as u64;
        if tokens_end > header_len {
            return Err(FormatError::field(
                "token_count",
                "token ids overrun the header",
            ));
        }
        let tokens: Vec<u32> = h[FIXED_HEADER_LEN..tokens_end as usize]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let parent_bytes = arr32(h, OFF_PARENT);
        let parent = if flags & FLAG_HAS_PARENT != 0 {
            Some(ChunkKey(parent_bytes))
        } else if parent_bytes != [0; 32] {
            return Err(FormatError::field(
                "parent",
                "set without the has-parent flag",
            ));
        } else {
            None
        };
        let meta = ChunkMeta {
            namespace: NamespaceId(arr32(h, OFF_NAMESPACE)),
            key: ChunkKey(arr32(h, OFF_KEY)),
            parent,
            salt: SaltTag(arr32(h, OFF_SALT)),
            dtype,
            kv_kind,
            num_layers: le_u32(h, OFF_LAYERS),
            num_heads: le_u32(h, OFF_HEADS),
            head_dim: le_u32(h, OFF_HEAD_DIM),
            group_tokens: le_u32(h, OFF_GROUP),
            tokens,
            origin,
        };
        let has_importance = flags & FLAG_IMPORTANCE != 0;
        let needed = if has_importance {
            VERSION
        } else {
            meta.version_with(codec)
        };
        if needed != version {
            return Err(FormatError::field(
                "version",
                format!("{version}, but the chunk's features need version {needed}"),
            ));
        }
        let geometry = Geometry::with_importance(&meta, has_importance)?;
        let computed = meta.computed_key();
        if computed != meta.key {
            return Err(FormatError::KeyMismatch {
                stored: meta.key.to_hex(),
                computed: computed.to_hex(),
            });
        }
        let (stored, layer_digests, mut off) = if codec == Codec::Raw {
            let (d, off) = Self::parse_layer_table(h, &geometry)?;
            (None, d, off)
        } else {
            let (t, d, off) = StoredTable::parse(h, &meta, &geometry, codec)?;
            (Some(Arc::new(t)), d, off)
        };
        let (want_header, want_file) = match &stored {
            Some(t) => (t.header_len, t.file_len),
            None => (geometry.header_len, geometry.file_len),
        };
        if want_header != header_len {
            return Err(FormatError::field(
                "header_len",
                format!("{header_len}, but the shape needs {want_header}"),
            ));
        }
        let file_len = le_u64(h, OFF_FILE_LEN);
        if file_len != want_file {
            return Err(FormatError::field(
                "file_len",
                format!("{file_len}, but the shape needs {want_file}"),
            ));
        }
        // The section follows the last table: the layer table of a raw chunk, the codec table
        // of a coded one (`header_len`, checked above, makes room for it).
        let importance = has_importance
            .then(|| {
                Importance::decode(
                    &h[off..off + geometry.importance_len as usize],
                    meta.num_layers,
                    geometry.groups(),
                )
            })
            .transpose()?;
        off += geometry.importance_len as usize;
        for pad in [
            tokens_end as usize..geometry.table_offset as usize,
            off..h.len(),
        ] {
            if let Some(p) = h[pad.clone()].iter().position(|&b| b != 0) {
                return Err(FormatError::NonZeroPadding {
                    offset: (pad.start + p) as u64,
                });
            }
        }
        let payload_digest = arr32(h, OFF_PAYLOAD_DIGEST);
        if payload_digest != payload_digest_of(&layer_digests) {
            return Err(FormatError::field(
                "payload_digest",
                "does not match the layer digests",
            ));
        }
        Ok(ChunkHeader {
            version,
            meta,
            geometry,
            codec,
            stored,
            layer_digests,
            payload_digest,
            importance,
        })
    }

    /// The raw layer table: extents checked against the shape; returns the layer digests and
    /// where the table ends.
    fn parse_layer_table(
        h: &[u8],
        geometry: &Geometry,
    ) -> Result<(Vec<[u8; 32]>, usize), FormatError> {
        let mut layer_digests = Vec::with_capacity(geometry.num_layers as usize);
        let mut off = geometry.table_offset as usize;
        for layer in 0..geometry.num_layers {
            for plane in 0..geometry.planes {
                let e = geometry.extent(layer, plane);
                let (start, len) = (le_u64(h, off), le_u64(h, off + 8));
                if start != e.start || len != geometry.extent_len {
                    return Err(FormatError::field(
                        "extent",
                        format!(
                            "layer {layer} plane {plane} is {start}+{len}, the shape needs {}+{}",
                            e.start, geometry.extent_len
                        ),
                    ));
                }
                off += 16;
            }
            layer_digests.push(arr32(h, off));
            off += 32;
        }
        Ok((layer_digests, off))
    }

    /// The stored layout of a coded chunk (None for raw).
    pub fn stored(&self) -> Option<&StoredTable> {
        self.stored.as_deref()
    }

    /// Bytes before the first layer.
    pub fn header_len(&self) -> u64 {
        self.stored()
            .map_or(self.geometry.header_len, |t| t.header_len)
    }

    /// Length of the file as stored (for a coded chunk, not the raw `geometry.file_len`).
    pub fn file_len(&self) -> u64 {
        self.stored().map_or(self.geometry.file_len, |t| t.file_len)
    }

    /// Byte range of one layer as stored, padding included: one aligned read.
    pub fn layer_span(&self, layer: u32) -> Range<u64> {
        match self.stored() {
            Some(t) => t.layer_span(layer),
            None => self.geometry.layer_span(layer),
        }
    }

    /// Reads and parses the header of an open chunk file (two small reads at most) and checks
    /// the file's size against it.
    pub fn read_from(file: &File) -> Result<ChunkHeader, FormatError> {
        let actual = file.metadata()?.len();
        let mut buf = vec![0u8; ALIGN as usize];
        let n = read_full_at(file, &mut buf, 0)?;
        let header_len = Self::peek_header_len(&buf[..n])?;
        if header_len > buf.len() as u64 {
            if header_len > actual {
                return Err(FormatError::Truncated {
                    needed: header_len,
                    have: actual,
                });
            }
            buf.resize(header_len as usize, 0);
            let n2 = read_full_at(file, &mut buf[ALIGN as usize..], ALIGN)?;
            buf.truncate(ALIGN as usize + n2);
        } else {
            buf.truncate(n);
        }
        let header = Self::parse(&buf)?;
        header.check_len(actual)?;
        Ok(header)
    }

    /// Checks that a file of `actual` bytes holds this chunk whole.
    pub fn check_len(&self, actual: u64) -> Result<(), FormatError> {
        let expected = self.file_len();
        if actual < expected {
            return Err(FormatError::Truncated {
                needed: expected,
                have: actual,
            });
        }
        if actual != expected {
            return Err(FormatError::SizeMismatch { expected, actual });
        }
        Ok(())
    }

    /// Checks one layer's bytes (as read from `layer_span(layer)`) against its digest and its
    /// padding against zero.
    pub fn verify_layer(&self, layer: u32, span: &[u8]) -> Result<(), FormatError> {
        if let Some(t) = self.stored() {
            let digest = &self.layer_digests[layer as usize];
            return t.verify_layer(&self.meta, &self.geometry, layer, digest, span);
        }
        let g = &self.geometry;
        let span_start = g.layer_span(layer).start;
        let mut planes: [&[u8]; 2] = [&[], &[]];
        for plane in 0..g.planes {
            let e = g.extent(layer, plane);
            let s = (e.start - span_start) as usize;
            planes[plane as usize] = &span[s..s + g.extent_len as usize];
            let pad_end = s + g.extent_stride as usize;
            if let Some(p) = span[s + g.extent_len as usize..pad_end]
                .iter()
                .position(|&b| b != 0)
            {
                return Err(FormatError::NonZeroPadding {
                    offset: e.end + p as u64,
                });
            }
        }
        if layer_digest(&planes[..g.planes as usize]) != self.layer_digests[layer as usize] {
            return Err(FormatError::PayloadDigest { layer });
        }
        Ok(())
    }

    /// Checks the payload of a whole chunk file held in memory.
    pub fn verify_payload(&self, file_bytes: &[u8]) -> Result<(), FormatError> {
        self.check_len(file_bytes.len() as u64)?;
        for layer in 0..self.geometry.num_layers {
            let span = self.layer_span(layer);
            self.verify_layer(layer, &file_bytes[span.start as usize..span.end as usize])?;
        }
        Ok(())
    }

    /// Checks the payload of an open file, one layer at a time (memory use: one layer).
    pub fn verify_file_payload(&self, file: &File) -> Result<(), FormatError> {
        self.check_len(file.metadata()?.len())?;
        let mut buf = Vec::new();
        for layer in 0..self.geometry.num_layers {
            let span = self.layer_span(layer);
            buf.resize((span.end - span.start) as usize, 0);
            let n = read_full_at(file, &mut buf, span.start)?;
            if n < buf.len() {
                return Err(FormatError::Truncated {
                    needed: span.end,
                    have: span.start + n as u64,
                });
            }
            self.verify_layer(layer, &buf)?;
        }
        Ok(())
    }

    pub fn key(&self) -> ChunkKey {
        self.meta.key
    }
}

/// Reads until `buf` is full or end of file; returns the bytes read.
pub fn read_full_at(file: &File, buf: &mut [u8], mut offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                offset += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// How much of a chunk to check when it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// Header only (checksum, shape, key): microseconds.
    #[default]
    Header,
    /// Header and every payload digest: one pass over the bytes.
    Full,
}

/// A chunk held in memory, borrowed: the planes are slices of the caller's buffer (no copy).
#[derive(Debug, Clone)]
pub struct ChunkView<'a> {
    pub header: ChunkHeader,
    bytes: &'a [u8],
}

impl<'a> ChunkView<'a> {
    pub fn parse(bytes: &'a [u8], verify: Verify) -> Result<ChunkView<'a>, FormatError> {
        let header = ChunkHeader::parse(bytes)?;
        header.check_len(bytes.len() as u64)?;
        if verify == Verify::Full {
            header.verify_payload(bytes)?;
        }
        Ok(ChunkView { header, bytes })
    }

    /// One plane of one layer: `[tokens, heads, head_dim]` elements, token-major, borrowed
    /// from the file's bytes. A coded chunk has no such bytes (its planes must be decoded:
    /// [`ChunkView::decoded_plane`]): [`FormatError::Coded`].
    pub fn plane(&self, layer: u32, plane: u32) -> Result<&'a [u8], FormatError> {
        if self.header.stored.is_some() {
            return Err(FormatError::Coded {
                codec: self.header.codec,
            });
        }
        let e = self.header.geometry.extent(layer, plane);
        Ok(&self.bytes[e.start as usize..e.end as usize])
    }

    /// One plane of one layer as raw bytes, whatever the chunk's codec: borrowed from the file
    /// for a raw chunk, decoded into `scratch` (resized to `extent_len`) for a coded one.
    pub fn decoded_plane<'s>(
        &self,
        coder: &mut crate::codec::Coder,
        layer: u32,
        plane: u32,
        scratch: &'s mut Vec<u8>,
    ) -> Result<&'s [u8], FormatError>
    where
        'a: 's,
    {
        if self.header.stored.is_none() {
            return self.plane(layer, plane);
        }
        scratch.resize(self.header.geometry.extent_len as usize, 0);
        crate::codec::stored::decode_plane(coder, &self.header, self.bytes, layer, plane, scratch)?;
        Ok(&scratch[..])
    }

    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// Encodes a chunk: `fill(layer, plane, dst)` writes each extent (`extent_len` bytes).
/// Returns the whole file.
pub fn encode_chunk(
    meta: &ChunkMeta,
    fill: impl FnMut(u32, u32, &mut [u8]),
) -> Result<Vec<u8>, FormatError> {
    encode_chunk_with(meta, None, fill)
}

/// [`encode_chunk`] with the version-2 importance section when `importance` is given (its
/// shape must be the chunk's: `num_layers` x groups).
pub fn encode_chunk_with(
    meta: &ChunkMeta,
    importance: Option<&Importance>,
    mut fill: impl FnMut(u32, u32, &mut [u8]),
) -> Result<Vec<u8>, FormatError> {
    let g = geometry_with(meta, importance)?;
    let mut out = vec![0u8; g.file_len as usize];
    for layer in 0..g.num_layers {
        for plane in 0..g.planes {
            let e = g.extent(layer, plane);
            fill(layer, plane, &mut out[e.start as usize..e.end as usize]);
        }
    }
    let (head, payload) = out.split_at_mut(g.header_len as usize);
    write_header(meta, importance, &g, head, payload)?;
    Ok(out)
}

/// The geometry of `meta`'s chunk carrying `importance`, whose shape must be the chunk's
/// (`num_layers` x groups).
pub(crate) fn geometry_with(
    meta: &ChunkMeta,
    importance: Option<&Importance>,
) -> Result<Geometry, FormatError> {
    let g = Geometry::with_importance(meta, importance.is_some())?;
    if let Some(imp) = importance
        && (imp.num_layers() != g.num_layers || imp.groups() != g.groups())
    {
        return Err(FormatError::field(
            "importance",
            format!(
                "{} layers x {} groups, the chunk has {} x {}",
                imp.num_layers(),
                imp.groups(),
                g.num_layers,
                g.groups()
            ),
        ));
    }
    Ok(g)
}

/// Encodes a chunk with `codec`: raw (format version 1, [`encode_chunk`]) or coded (version 2,
/// each group encoded on its own); `fill` writes each raw extent.
pub fn encode_chunk_coded(
    meta: &ChunkMeta,
    codec: Codec,
    fill: impl FnMut(u32, u32, &mut [u8]),
) -> Result<Vec<u8>, FormatError> {
    encode_chunk_coded_with(meta, codec, None, fill)
}

/// [`encode_chunk_coded`] with the version-2 importance section when `importance` is given:
/// after the layer table of a raw chunk, after the codec table of a coded one.
pub fn encode_chunk_coded_with(
    meta: &ChunkMeta,
    codec: Codec,
    importance: Option<&Importance>,
    fill: impl FnMut(u32, u32, &mut [u8]),
) -> Result<Vec<u8>, FormatError> {
    match codec {
        Codec::Raw => encode_chunk_with(meta, importance, fill),
        _ => crate::codec::stored::encode_coded(meta, codec, importance, fill),
    }
}

/// Encodes a chunk from its planes given as slices, `planes[layer * planes_per_layer + plane]`.
pub fn encode_chunk_from(meta: &ChunkMeta, planes: &[&[u8]]) -> Result<Vec<u8>, FormatError> {
    let g = meta.geometry()?;
    if planes.len() != (g.num_layers * g.planes) as usize
        || planes.iter().any(|p| p.len() as u64 != g.extent_len)
    {
        return Err(FormatError::field(
            "planes",
            format!(
                "need {} planes of {} bytes",
                g.num_layers * g.planes,
                g.extent_len
            ),
        ));
    }
    encode_chunk(meta, |l, p, dst| {
        dst.copy_from_slice(planes[(l * g.planes + p) as usize])
    })
}

fn write_header(
    meta: &ChunkMeta,
    importance: Option<&Importance>,
    g: &Geometry,
    head: &mut [u8],
    payload: &[u8],
) -> Result<(), FormatError> {
    let computed = meta.computed_key();
    if computed != meta.key {
        return Err(FormatError::KeyMismatch {
            stored: meta.key.to_hex(),
            computed: computed.to_hex(),
        });
    }
    let mut layer_digests = Vec::with_capacity(g.num_layers as usize);
    for layer in 0..g.num_layers {
        let mut planes: [&[u8]; 2] = [&[], &[]];
        for plane in 0..g.planes {
            let e = g.extent(layer, plane);
            let s = (e.start - g.header_len) as usize;
            planes[plane as usize] = &payload[s..s + g.extent_len as usize];
        }
        layer_digests.push(layer_digest(&planes[..g.planes as usize]));
    }
    write_raw_header(meta, importance, g, head, &layer_digests)
}

/// The header of the raw chunk `meta` with `importance` whose layer digests are
/// `layer_digests` (what a lossless chunk decodes to: its raw digests are kept in its codec
/// table, its importance section is the raw chunk's).
pub fn raw_header(
    meta: &ChunkMeta,
    importance: Option<&Importance>,
    layer_digests: &[[u8; 32]],
) -> Result<Vec<u8>, FormatError> {
    let g = geometry_with(meta, importance)?;
    let mut head = vec![0u8; g.header_len as usize];
    write_raw_header(meta, importance, &g, &mut head, layer_digests)?;
    Ok(head)
}

fn write_raw_header(
    meta: &ChunkMeta,
    importance: Option<&Importance>,
    g: &Geometry,
    head: &mut [u8],
    layer_digests: &[[u8; 32]],
) -> Result<(), FormatError> {
    write_fixed(
        meta,
        g,
        head,
        Codec::Raw,
        importance.is_some(),
        (g.header_len, g.file_len),
        layer_digests,
    )?;
    let mut off = g.table_offset as usize;
    for (layer, digest) in layer_digests.iter().enumerate() {
        for plane in 0..g.planes {
            let e = g.extent(layer as u32, plane);
            head[off..off + 8].copy_from_slice(&e.start.to_le_bytes());
            head[off + 8..off + 16].copy_from_slice(&g.extent_len.to_le_bytes());
            off += 16;
        }
        head[off..off + 32].copy_from_slice(digest);
        off += 32;
    }
    if let Some(imp) = importance {
        imp.encode(&mut head[off..off + g.importance_len as usize]);
    }
    finish_header(head);
    Ok(())
}

/// Zeroes `head` and writes the fixed part and the token ids (version 1 for raw chunks, 2
/// for coded ones); the caller writes the tables and then [`finish_header`].
pub(crate) fn write_fixed(
    meta: &ChunkMeta,
    g: &Geometry,
    head: &mut [u8],
    codec: Codec,
    importance: bool,
    (header_len, file_len): (u64, u64),
    layer_digests: &[[u8; 32]],
) -> Result<(), FormatError> {
    let computed = meta.computed_key();
    if computed != meta.key {
        return Err(FormatError::KeyMismatch {
            stored: meta.key.to_hex(),
            computed: computed.to_hex(),
        });
    }
    let version = if importance {
        VERSION
    } else {
        meta.version_with(codec)
    };
    head.fill(0);
    head[..8].copy_from_slice(&MAGIC);
    head[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&version.to_le_bytes());
    head[OFF_KV_KIND] = meta.kv_kind as u8;
    head[OFF_DTYPE] = meta.dtype as u8;
    head[OFF_HEADER_LEN..OFF_HEADER_LEN + 4].copy_from_slice(&(header_len as u32).to_le_bytes());
    let mut flags = match (meta.parent.is_some(), meta.origin.is_some()) {
        (true, _) => FLAG_HAS_PARENT,
        (false, true) => FLAG_INDEPENDENT,
        (false, false) => 0,
    };
    if importance {
        flags |= FLAG_IMPORTANCE;
    }
    head[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&flags.to_le_bytes());
    head[OFF_CODEC] = codec as u8;
    for (off, v) in [
        (OFF_LAYERS, meta.num_layers),
        (OFF_HEADS, meta.num_heads),
        (OFF_HEAD_DIM, meta.head_dim),
        (OFF_TOKENS, g.token_count),
        (OFF_GROUP, meta.group_tokens),
        (OFF_ORIGIN, meta.origin.unwrap_or(0)),
    ] {
        head[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    head[OFF_FILE_LEN..OFF_FILE_LEN + 8].copy_from_slice(&file_len.to_le_bytes());
    head[OFF_NAMESPACE..OFF_NAMESPACE + 32].copy_from_slice(&meta.namespace.0);
    head[OFF_KEY..OFF_KEY + 32].copy_from_slice(&meta.key.0);
    if let Some(p) = &meta.parent {
        head[OFF_PARENT..OFF_PARENT + 32].copy_from_slice(&p.0);
    }
    head[OFF_SALT..OFF_SALT + 32].copy_from_slice(&meta.salt.0);
    head[OFF_PAYLOAD_DIGEST..OFF_PAYLOAD_DIGEST + 32]
        .copy_from_slice(&payload_digest_of(layer_digests));
    for (i, t) in meta.tokens.iter().enumerate() {
        let o = FIXED_HEADER_LEN + 4 * i;
        head[o..o + 4].copy_from_slice(&t.to_le_bytes());
    }
    Ok(())
}

/// Writes the header checksum over a complete header.
pub(crate) fn finish_header(head: &mut [u8]) {
    let sum = header_checksum(head);
    head[OFF_HEADER_CHECKSUM..OFF_HEADER_CHECKSUM + 32].copy_from_slice(&sum);
}

/// Deterministic pseudo-KV bytes for synthetic chunks (`kvfs synth`, tests, benchmarks):
/// a fast xorshift stream seeded by the chunk key, layer and plane, so every host produces
/// the same bytes for the same key.
pub fn synth_fill(key: &ChunkKey, layer: u32, plane: u32, dst: &mut [u8]) {
    let seed = u64::from_le_bytes(key.0[..8].try_into().unwrap())
        ^ ((layer as u64) << 32 | plane as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut x = seed | 1;
    let mut chunks = dst.chunks_exact_mut(8);
    for c in &mut chunks {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let len = rest.len();
    rest.copy_from_slice(&x.wrapping_mul(31).to_le_bytes()[..len]);
}

/// A synthetic chunk of `spec` (see [`synth_fill`]), written with the spec's codec.
pub fn synth_chunk(
    spec: &ModelSpec,
    parent: Option<ChunkKey>,
    salt: SaltTag,
    tokens: Vec<u32>,
) -> Result<(ChunkMeta, Vec<u8>), FormatError> {
    let meta = ChunkMeta::for_spec(spec, parent, salt, tokens);
    let (key, dtype) = (meta.key, meta.dtype);
    // Random bits hold NaN and infinity patterns, which a lossy codec refuses: its synthetic
    // chunks have those elements zeroed (raw and lossless chunks keep every bit).
    let lossy = !spec.codec.is_lossless();
    let bytes = encode_chunk_coded(&meta, spec.codec, |l, p, dst| {
        synth_fill(&key, l, p, dst);
        if lossy {
            crate::codec::zero_non_finite(dtype, dst);
        }
    })?;
    Ok((meta, bytes))
}
