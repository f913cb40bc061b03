//! Where a coded chunk's bytes live: the v2 codec table (docs/FORMAT.md, "Codecs").
//!
//! A chunk whose `codec` byte is not raw stores each group of each plane in its codec's form.
//! Every layer starts on a 4096-byte boundary; inside it the groups of plane 0 and then of
//! plane 1 follow each other without gaps, and the layer ends with zero padding to the next
//! boundary. So a layer is one aligned read, a run of groups of one plane is one contiguous
//! read, and a selective load reads only the groups it needs.
//!
//! After the layer table (whose entries now give each plane's stored range and whose layer
//! digest covers the stored bytes), the header holds the codec table:
//! - lossless codecs only: `num_layers` raw layer digests (32 bytes each), the layer digests
//!   the raw chunk would have, checked on the decoded bytes;
//! - one `u32` stored length per group, layer-major, then plane, then group;
//!
//! and after it, when the chunk has one, the importance section (`crate::importance`).
//!
//! Everything else (each plane's offset, each layer's start, the file length) follows from
//! those lengths and is checked against them when a header is parsed.

use super::{Codec, CodecError, Coder, GroupShape};
use crate::error::FormatError;
use crate::format::{self, ALIGN, ChunkMeta, Geometry, align_up};
use crate::importance::Importance;
use crate::spec::KvKind;
use std::ops::Range;

/// Upper bound on `num_layers * planes * groups` of a coded chunk: 16 MiB of group table.
pub const MAX_GROUP_ENTRIES: u64 = 1 << 22;
/// Most a lossless group may grow over its raw size (stream headers).
const LOSSLESS_SLACK: usize = 64;

/// The stored layout of a coded chunk, derived from its group lengths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTable {
    pub codec: Codec,
    pub header_len: u64,
    pub file_len: u64,
    planes: u32,
    groups: u32,
    /// Per (layer, plane): `groups + 1` absolute offsets (prefix sums of the group lengths).
    offsets: Vec<u64>,
    /// Per layer: the layer digests of the raw chunk (lossless codecs; empty otherwise).
    pub raw_digests: Vec<[u8; 32]>,
}

/// Shape of group `g` of `plane` of a chunk with geometry `g`.
pub fn group_shape(meta: &ChunkMeta, geo: &Geometry, plane: u32, group: u32) -> GroupShape {
    let t = geo.group_tokens_range(group);
    GroupShape {
        dtype: meta.dtype,
        plane,
        keys_per_channel: meta.kv_kind == KvKind::KeyValue,
        tokens: (t.end - t.start) as usize,
        heads: meta.num_heads as usize,
        head_dim: meta.head_dim as usize,
    }
}

/// Bytes of the codec table.
fn codec_table_len(codec: Codec, geo: &Geometry) -> u64 {
    let digests = if codec.is_lossless() {
        geo.num_layers as u64 * 32
    } else {
        0
    };
    digests + entries(geo) * 4
}

fn entries(geo: &Geometry) -> u64 {
    geo.num_layers as u64 * geo.planes as u64 * geo.groups() as u64
}

/// Where the layer table ends and the codec table starts.
pub(crate) fn codec_table_offset(geo: &Geometry) -> u64 {
    geo.table_offset + geo.num_layers as u64 * (geo.planes as u64 * 16 + 32)
}

impl StoredTable {
    /// Builds the layout from the group lengths (`lens[(layer * planes + plane) * groups + g]`).
    fn from_lens(
        codec: Codec,
        geo: &Geometry,
        lens: &[u32],
        raw_digests: Vec<[u8; 32]>,
    ) -> Result<StoredTable, FormatError> {
        if entries(geo) > MAX_GROUP_ENTRIES {
            return Err(FormatError::field(
                "group_tokens",
                format!(
                    "{} groups in all; a coded chunk holds at most {MAX_GROUP_ENTRIES}",
                    entries(geo)
                ),
            ));
        }
        // An importance section, if any, follows the codec table.
        let header_len = align_up(
            codec_table_offset(geo) + codec_table_len(codec, geo) + geo.importance_len,
            ALIGN,
        );
        let groups = geo.groups();
        let mut offsets =
            Vec::with_capacity((geo.num_layers * geo.planes) as usize * (groups as usize + 1));
        let mut at = header_len;
        let mut lens = lens.iter();
        for _ in 0..geo.num_layers {
            for _ in 0..geo.planes {
                offsets.push(at);
                for _ in 0..groups {
                    at += *lens.next().expect("one length per group") as u64;
                    offsets.push(at);
                }
            }
            at = align_up(at, ALIGN);
            if at >= 1 << 48 {
                return Err(FormatError::field("file_len", "chunk would exceed 256 TiB"));
            }
        }
        Ok(StoredTable {
            codec,
            header_len,
            file_len: at,
            planes: geo.planes,
            groups,
            offsets,
            raw_digests,
        })
    }

    fn plane_offsets(&self, layer: u32, plane: u32) -> &[u64] {
        let g = self.groups as usize + 1;
        let i = (layer * self.planes + plane) as usize * g;
        &self.offsets[i..i + g]
    }

    /// Stored bytes of groups `groups` of one plane of one layer (one contiguous range).
    pub fn groups_range(&self, layer: u32, plane: u32, groups: Range<u32>) -> Range<u64> {
        let o = self.plane_offsets(layer, plane);
        o[groups.start as usize]..o[groups.end as usize]
    }

    /// Stored bytes of one plane of one layer.
    pub fn plane_range(&self, layer: u32, plane: u32) -> Range<u64> {
        self.groups_range(layer, plane, 0..self.groups)
    }

    /// A layer's stored span, padding included: one aligned read.
    pub fn layer_span(&self, layer: u32) -> Range<u64> {
        let start = self.plane_range(layer, 0).start;
        let end = self.plane_range(layer, self.planes - 1).end;
        start..align_up(end, ALIGN)
    }

    /// Group offsets of one plane relative to `base` (for slicing a buffer read from `base`).
    pub fn group_in(&self, layer: u32, plane: u32, group: u32, base: u64) -> Range<usize> {
        let r = self.groups_range(layer, plane, group..group + 1);
        (r.start - base) as usize..(r.end - base) as usize
    }

    /// Parses and checks the codec table of header `h` (layer table entries included) and
    /// returns the table with the stored layer digests.
    pub(crate) fn parse(
        h: &[u8],
        meta: &ChunkMeta,
        geo: &Geometry,
        codec: Codec,
    ) -> Result<(StoredTable, Vec<[u8; 32]>, usize), FormatError> {
        if entries(geo) > MAX_GROUP_ENTRIES {
            return Err(FormatError::field(
                "group_tokens",
                "too many groups for a coded chunk",
            ));
        }
        let table_end = codec_table_offset(geo) + codec_table_len(codec, geo);
        if table_end > h.len() as u64 {
            return Err(FormatError::field(
                "header_len",
                "too short for the codec table",
            ));
        }
        let mut off = codec_table_offset(geo) as usize;
        let raw_digests = if codec.is_lossless() {
            (0..geo.num_layers)
                .map(|_| {
                    off += 32;
                    h[off - 32..off].try_into().unwrap()
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut lens = Vec::with_capacity(entries(geo) as usize);
        for layer in 0..geo.num_layers {
            for plane in 0..geo.planes {
                for g in 0..geo.groups() {
                    let len = format::le_u32(h, off);
                    off += 4;
                    let shape = group_shape(meta, geo, plane, g);
                    let ok = match codec.fixed_len(&shape) {
                        Some(n) => len as usize == n,
                        None => len > 0 && len as usize <= shape.raw_len() + LOSSLESS_SLACK,
                    };
                    if !ok {
                        return Err(FormatError::field(
                            "group_len",
                            format!(
                                "layer {layer} plane {plane} group {g}: {len} bytes is not a \
                                 {codec} group of {} raw bytes",
                                shape.raw_len()
                            ),
                        ));
                    }
                    lens.push(len);
                }
            }
        }
        let table = StoredTable::from_lens(codec, geo, &lens, raw_digests)?;
        let mut digests = Vec::with_capacity(geo.num_layers as usize);
        let mut t = geo.table_offset as usize;
        for layer in 0..geo.num_layers {
            for plane in 0..geo.planes {
                let r = table.plane_range(layer, plane);
                let (start, len) = (format::le_u64(h, t), format::le_u64(h, t + 8));
                if start != r.start || len != r.end - r.start {
                    return Err(FormatError::field(
                        "extent",
                        format!(
                            "layer {layer} plane {plane} is {start}+{len}, the group table \
                             needs {}+{}",
                            r.start,
                            r.end - r.start
                        ),
                    ));
                }
                t += 16;
            }
            digests.push(h[t..t + 32].try_into().unwrap());
            t += 32;
        }
        Ok((table, digests, off))
    }

    /// Checks one layer's stored span (as read from [`StoredTable::layer_span`]): zero
    /// padding, the stored digest and, for the lossless codec, the digest of the decoded
    /// bytes against the raw chunk's layer digest.
    pub(crate) fn verify_layer(
        &self,
        meta: &ChunkMeta,
        geo: &Geometry,
        layer: u32,
        stored_digest: &[u8; 32],
        span: &[u8],
    ) -> Result<(), FormatError> {
        self.check_stored(layer, stored_digest, span)?;
        if self.codec == Codec::Lossless {
            self.decode_layer_unchecked(
                meta,
                geo,
                layer,
                span,
                &mut Coder::new(),
                &mut Vec::new(),
            )?;
        }
        Ok(())
    }

    /// Checks one layer's stored span like [`StoredTable::verify_layer`] and decodes it into
    /// `out` as the raw chunk's layer span (planes `extent_stride` apart, zero padding): what
    /// a remote tier writes locally for a lossless object. Lossless codecs only.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_layer(
        &self,
        meta: &ChunkMeta,
        geo: &Geometry,
        layer: u32,
        stored_digest: &[u8; 32],
        span: &[u8],
        coder: &mut Coder,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        assert!(
            self.codec == Codec::Lossless,
            "decode_layer of a {} chunk",
            self.codec
        );
        self.check_stored(layer, stored_digest, span)?;
        self.decode_layer_unchecked(meta, geo, layer, span, coder, out)
    }

    /// Zero padding and the stored digest of one layer's span.
    fn check_stored(
        &self,
        layer: u32,
        stored_digest: &[u8; 32],
        span: &[u8],
    ) -> Result<(), FormatError> {
        let s = self.layer_span(layer);
        let used = (self.plane_range(layer, self.planes - 1).end - s.start) as usize;
        if let Some(p) = span[used..].iter().position(|&b| b != 0) {
            return Err(FormatError::NonZeroPadding {
                offset: s.start + (used + p) as u64,
            });
        }
        if blake3::hash(&span[..used]).as_bytes() != stored_digest {
            return Err(FormatError::StoredDigest {
                codec: self.codec,
                layer,
            });
        }
        Ok(())
    }

    /// Decodes every group of one plane from `src` (file bytes from offset `base`) into
    /// `extent` (`extent_len` bytes).
    #[allow(clippy::too_many_arguments)]
    fn decode_plane_from(
        &self,
        coder: &mut Coder,
        meta: &ChunkMeta,
        geo: &Geometry,
        layer: u32,
        plane: u32,
        src: &[u8],
        base: u64,
        extent: &mut [u8],
    ) -> Result<(), FormatError> {
        let tb = geo.token_bytes as usize;
        for g in 0..self.groups {
            let shape = group_shape(meta, geo, plane, g);
            let t = geo.group_tokens_range(g);
            let r = self.group_in(layer, plane, g, base);
            coder
                .decode(
                    self.codec,
                    &shape,
                    &src[r],
                    &mut extent[t.start as usize * tb..t.end as usize * tb],
                )
                .map_err(|source| FormatError::Decode {
                    layer,
                    plane,
                    group: g,
                    source,
                })?;
        }
        Ok(())
    }

    /// Decodes a layer into `out` (raw layer span) and checks it against the raw digest.
    fn decode_layer_unchecked(
        &self,
        meta: &ChunkMeta,
        geo: &Geometry,
        layer: u32,
        span: &[u8],
        coder: &mut Coder,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        let base = self.layer_span(layer).start;
        let stride = geo.extent_stride as usize;
        out.clear();
        out.resize(self.planes as usize * stride, 0);
        let mut hasher = blake3::Hasher::new();
        for plane in 0..self.planes {
            let extent = &mut out[plane as usize * stride..][..geo.extent_len as usize];
            self.decode_plane_from(coder, meta, geo, layer, plane, span, base, extent)?;
            hasher.update(extent);
        }
        if hasher.finalize().as_bytes() != &self.raw_digests[layer as usize] {
            return Err(FormatError::DecodedDigest {
                codec: self.codec,
                layer,
            });
        }
        Ok(())
    }
}

/// Encodes a coded chunk: `fill(layer, plane, dst)` writes each raw extent (`extent_len`
/// bytes); each group is encoded with `codec`; `importance`, if any, goes after the codec
/// table. Returns the whole file.
pub fn encode_coded(
    meta: &ChunkMeta,
    codec: Codec,
    importance: Option<&Importance>,
    mut fill: impl FnMut(u32, u32, &mut [u8]),
) -> Result<Vec<u8>, FormatError> {
    let geo = format::geometry_with(meta, importance)?;
    let mut coder = Coder::new();
    let mut raw = vec![0u8; geo.extent_len as usize];
    let mut layers: Vec<Vec<u8>> = Vec::with_capacity(geo.num_layers as usize);
    let mut lens = Vec::new();
    let mut raw_digests = Vec::new();
    let mut stored_digests = Vec::new();
    for layer in 0..geo.num_layers {
        let mut body = Vec::new();
        let mut raw_hash = blake3::Hasher::new();
        for plane in 0..geo.planes {
            fill(layer, plane, &mut raw);
            raw_hash.update(&raw);
            for g in 0..geo.groups() {
                let shape = group_shape(meta, &geo, plane, g);
                let t = geo.group_tokens_range(g);
                let tb = geo.token_bytes as usize;
                let before = body.len();
                coder
                    .encode(
                        codec,
                        &shape,
                        &raw[t.start as usize * tb..t.end as usize * tb],
                        &mut body,
                    )
                    .map_err(|source| FormatError::Decode {
                        layer,
                        plane,
                        group: g,
                        source,
                    })?;
                lens.push((body.len() - before) as u32);
            }
        }
        if codec.is_lossless() {
            raw_digests.push(*raw_hash.finalize().as_bytes());
        }
        stored_digests.push(*blake3::hash(&body).as_bytes());
        layers.push(body);
    }
    let table = StoredTable::from_lens(codec, &geo, &lens, raw_digests)?;
    let mut out = vec![0u8; table.file_len as usize];
    for (layer, body) in layers.iter().enumerate() {
        let s = table.layer_span(layer as u32).start as usize;
        out[s..s + body.len()].copy_from_slice(body);
    }
    let head = &mut out[..table.header_len as usize];
    format::write_fixed(
        meta,
        &geo,
        head,
        codec,
        importance.is_some(),
        (table.header_len, table.file_len),
        &stored_digests,
    )?;
    let mut t = geo.table_offset as usize;
    for (layer, digest) in stored_digests.iter().enumerate() {
        for plane in 0..geo.planes {
            let r = table.plane_range(layer as u32, plane);
            head[t..t + 8].copy_from_slice(&r.start.to_le_bytes());
            head[t + 8..t + 16].copy_from_slice(&(r.end - r.start).to_le_bytes());
            t += 16;
        }
        head[t..t + 32].copy_from_slice(digest);
        t += 32;
    }
    for d in &table.raw_digests {
        head[t..t + 32].copy_from_slice(d);
        t += 32;
    }
    for len in &lens {
        head[t..t + 4].copy_from_slice(&len.to_le_bytes());
        t += 4;
    }
    if let Some(imp) = importance {
        imp.encode(&mut head[t..t + geo.importance_len as usize]);
    }
    format::finish_header(head);
    Ok(out)
}

/// Decodes one whole plane of a coded chunk held in memory into `dst` (`extent_len` bytes).
pub fn decode_plane(
    coder: &mut Coder,
    header: &format::ChunkHeader,
    bytes: &[u8],
    layer: u32,
    plane: u32,
    dst: &mut [u8],
) -> Result<(), FormatError> {
    let table = header.stored().expect("a coded chunk");
    table.decode_plane_from(
        coder,
        &header.meta,
        &header.geometry,
        layer,
        plane,
        bytes,
        0,
        dst,
    )
}

/// Re-encodes a whole chunk held in memory with `codec` (keys, namespace and tokens kept).
/// Decoding a lossless chunk back to raw checks every layer against its raw digest.
pub fn transcode(bytes: &[u8], codec: Codec) -> Result<Vec<u8>, FormatError> {
    if !codec.is_lossless() {
        return Err(FormatError::field(
            "codec",
            format!(
                "{codec} is lossy: its chunks belong to their own namespace, so they are \
                 encoded from KV under that namespace's spec, never transcoded"
            ),
        ));
    }
    let header = format::ChunkHeader::parse(bytes)?;
    header.check_len(bytes.len() as u64)?;
    if header.codec == codec {
        return Ok(bytes.to_vec());
    }
    let meta = header.meta.clone();
    let mut coder = Coder::new();
    let mut failure = None;
    let fill = |l: u32, p: u32, dst: &mut [u8]| {
        if failure.is_some() {
            return;
        }
        match header.stored() {
            None => {
                let e = header.geometry.extent(l, p);
                dst.copy_from_slice(&bytes[e.start as usize..e.end as usize]);
            }
            Some(_) => {
                if let Err(e) = decode_plane(&mut coder, &header, bytes, l, p, dst) {
                    failure = Some(e);
                }
            }
        }
    };
    let out = format::encode_chunk_coded_with(&meta, codec, header.importance.as_ref(), fill)?;
    if let Some(e) = failure {
        return Err(e);
    }
    if let (Some(t), Codec::Raw) = (header.stored(), codec)
        && t.codec == Codec::Lossless
    {
        let raw = format::ChunkHeader::parse(&out)?;
        for (layer, (a, b)) in raw.layer_digests.iter().zip(&t.raw_digests).enumerate() {
            if a != b {
                return Err(FormatError::DecodedDigest {
                    codec: t.codec,
                    layer: layer as u32,
                });
            }
        }
    }
    Ok(out)
}

impl From<CodecError> for FormatError {
    fn from(e: CodecError) -> Self {
        FormatError::Codec(e)
    }
}
