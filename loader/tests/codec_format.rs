//! Format version 2, codecs: golden bytes per codec, round trips, layout, and a typed error
//! for every way a coded chunk can be wrong.

use kvfs_loader::codec::stored::{self, decode_plane, transcode};
use kvfs_loader::codec::{Codec, Coder};
use kvfs_loader::format::{self, ALIGN, ChunkHeader, ChunkView, Verify, encode_chunk_coded};
use kvfs_loader::{ChunkKey, ChunkMeta, Dtype, FormatError, ModelSpec, SaltTag};

fn meta_of(spec: &ModelSpec) -> ChunkMeta {
    let parent = ChunkKey::derive(&spec.namespace_id(), None, &SaltTag::NONE, &[9, 8, 7]);
    ChunkMeta::for_spec(
        spec,
        Some(parent),
        SaltTag::of(b"golden"),
        (100..132).collect(),
    )
}

fn tiny_meta() -> ChunkMeta {
    meta_of(&ModelSpec::preset("tiny").unwrap())
}

/// KV-like f16/bf16/f32 values (a per-channel offset plus a smooth per-token wave), so the
/// lossless codec has real structure to find; deterministic, so golden digests hold.
fn kv_fill(meta: &ChunkMeta) -> impl Fn(u32, u32, &mut [u8]) + '_ {
    move |l, p, dst| {
        let n = dst.len() / meta.dtype.size();
        let ch = (meta.num_heads * meta.head_dim) as usize;
        let v: Vec<f32> = (0..n)
            .map(|i| {
                let (t, c) = (i / ch, i % ch);
                let base = if c % 17 == 0 { 6.0 } else { 0.3 };
                base * (1.0 + l as f32) * ((t as f32 * 0.37 + c as f32 * 1.3 + p as f32).sin())
            })
            .collect();
        kvfs_loader::codec::from_f32(meta.dtype, &v, dst);
    }
}

fn encode(meta: &ChunkMeta, codec: Codec) -> Vec<u8> {
    encode_chunk_coded(meta, codec, kv_fill(meta)).unwrap()
}

/// Golden bytes of a coded chunk per codec: a change to the v2 layout or a codec's stored
/// form must update docs/FORMAT.md along with these values.
#[test]
fn golden_bytes_per_codec() {
    let meta = tiny_meta();
    for (codec, len, digest) in GOLDEN {
        let bytes = encode(&meta, codec);
        let head: String = bytes[..24].iter().map(|b| format!("{b:02x}")).collect();
        // magic, version 2, kv, f16, header_len 4096, flags 1 (parent), the codec byte.
        assert_eq!(
            head,
            format!(
                "4b56465343484e4b020001010010000001000000{:02x}000000",
                codec as u8
            ),
            "{codec}"
        );
        assert_eq!(bytes.len(), len, "{codec}");
        assert_eq!(blake3::hash(&bytes).to_hex().as_str(), digest, "{codec}");
    }
}

const GOLDEN: [(Codec, usize, &str); 5] = [
    (
        Codec::Lossless,
        36864,
        "79c3ddb5713393e5d20888f332732f4792c7c4432fccddaaa7bd839fa90a98c5",
    ),
    (
        Codec::Fp8,
        28672,
        "66a071a76ad00ee4688bae70f9be2fb537fccd5a8d0bf54cb370c2b82a3603f2",
    ),
    (
        Codec::Kivi4,
        20480,
        "f25b4f9d56aa4b69a064e4202f8c656a7ed8b9e6990e66c071bc50f67100ef90",
    ),
    (
        Codec::Kivi2,
        12288,
        "de7cd4cc9b4abf2e886883920fe11269f813e81a221748fba23b5650731b5480",
    ),
    (
        Codec::Int8,
        28672,
        "9fc9afeeca311fb162fb007b4a6b73d98de9c74d87c572bfef718ae4c7491d50",
    ),
];

/// The int8 layout as docs/FORMAT.md gives it, computed here from the KV by that text alone:
/// a group is its rows' scale bytes (`e << 3 | m` for `2^(e - 20) * (1 + m / 8)`, the
/// smallest at least `absmax / 127`), then every row's codes `round(x / scale)` as `i8`.
#[test]
fn int8_golden_group_follows_the_documented_layout() {
    let meta = tiny_meta();
    let bytes = encode(&meta, Codec::Int8);
    let h = ChunkHeader::parse(&bytes).unwrap();
    let g = &h.geometry;
    let (heads, d) = (meta.num_heads as usize, meta.head_dim as usize);
    let mut raw = vec![0u8; g.extent_len as usize];
    kv_fill(&meta)(1, 1, &mut raw);
    let mut x = Vec::new();
    kvfs_loader::codec::to_f32(meta.dtype, &raw, &mut x);
    // Group 1 of plane 1 of layer 1: tokens 16..32.
    let r = h.stored().unwrap().groups_range(1, 1, 1..2);
    let group = &bytes[r.start as usize..r.end as usize];
    let rows = 16 * heads;
    assert_eq!(group.len(), rows * (1 + d));
    let scale_of = |b: u8| {
        if b == 0 {
            0.0
        } else {
            2f64.powi((b >> 3) as i32 - 20) * (1.0 + (b & 7) as f64 / 8.0)
        }
    };
    for row in 0..rows {
        let xs = &x[(16 * heads + row) * d..][..d];
        let amax = xs.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
        let want = (0..=255u8).find(|&b| scale_of(b) >= amax / 127.0).unwrap();
        assert_eq!(group[row], want, "row {row}");
        let scale = scale_of(want);
        for (k, v) in xs.iter().enumerate() {
            let q = group[rows + row * d + k] as i8 as f64;
            assert_eq!(
                q,
                (*v as f64 / scale).round_ties_even(),
                "row {row} elem {k}"
            );
        }
    }
}

#[test]
fn raw_stays_version_1() {
    let meta = tiny_meta();
    let bytes = encode(&meta, Codec::Raw);
    assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), format::VERSION_1);
    assert_eq!(bytes, format::encode_chunk(&meta, kv_fill(&meta)).unwrap());
}

fn decoded_planes(bytes: &[u8]) -> Vec<Vec<u8>> {
    let v = ChunkView::parse(bytes, Verify::Full).unwrap();
    let h = &v.header;
    let g = &h.geometry;
    let mut coder = Coder::new();
    let mut out = Vec::new();
    for l in 0..g.num_layers {
        for p in 0..g.planes {
            let mut dst = vec![0u8; g.extent_len as usize];
            decode_plane(&mut coder, h, bytes, l, p, &mut dst).unwrap();
            out.push(dst);
        }
    }
    out
}

#[test]
fn every_codec_round_trips_every_dtype_and_kind() {
    for dtype in [Dtype::F16, Dtype::Bf16, Dtype::F32] {
        for preset in ["tiny", "deepseek-v2-lite"] {
            let mut spec = ModelSpec::preset(preset).unwrap();
            spec.dtype = dtype;
            spec.num_layers = 2;
            let meta = meta_of(&spec);
            let raw = format::encode_chunk(&meta, kv_fill(&meta)).unwrap();
            let raw_view = ChunkView::parse(&raw, Verify::Full).unwrap();
            for codec in Codec::ALL.into_iter().filter(|c| *c != Codec::Raw) {
                let bytes = encode(&meta, codec);
                let h = ChunkHeader::parse(&bytes).unwrap();
                assert_eq!((h.codec, h.meta.key), (codec, meta.key));
                let planes = decoded_planes(&bytes);
                let g = &h.geometry;
                for (i, plane) in planes.iter().enumerate() {
                    let want = raw_view
                        .plane(i as u32 / g.planes, i as u32 % g.planes)
                        .unwrap();
                    if codec == Codec::Lossless {
                        assert_eq!(plane, want, "{dtype} {preset} lossless is exact");
                    } else {
                        let (mut a, mut b) = (Vec::new(), Vec::new());
                        kvfs_loader::codec::to_f32(dtype, want, &mut a);
                        kvfs_loader::codec::to_f32(dtype, plane, &mut b);
                        let amax = a.iter().fold(0f32, |m, x| m.max(x.abs()));
                        let err = a
                            .iter()
                            .zip(&b)
                            .map(|(x, y)| (x - y).abs())
                            .fold(0.0, f32::max);
                        assert!(
                            err <= amax * 0.4,
                            "{dtype} {preset} {codec}: {err} of {amax}"
                        );
                    }
                }
                // Smaller than raw, by the codec's nature.
                assert!(bytes.len() <= raw.len(), "{dtype} {preset} {codec}");
            }
        }
    }
}

#[test]
fn layers_are_aligned_and_groups_back_to_back() {
    let mut spec = ModelSpec::preset("llama-3-8b").unwrap();
    spec.num_layers = 3;
    let meta = ChunkMeta::for_spec(&spec, None, SaltTag::NONE, (0..256).collect());
    for codec in [Codec::Lossless, Codec::Fp8, Codec::Kivi4, Codec::Int8] {
        let bytes = encode(&meta, codec);
        let h = ChunkHeader::parse(&bytes).unwrap();
        let t = h.stored().unwrap();
        assert_eq!(h.header_len() % ALIGN, 0);
        assert_eq!(h.file_len(), bytes.len() as u64);
        for l in 0..3 {
            let span = h.layer_span(l);
            assert_eq!((span.start % ALIGN, span.end % ALIGN), (0, 0));
            assert_eq!(t.plane_range(l, 0).start, span.start);
            assert_eq!(t.plane_range(l, 0).end, t.plane_range(l, 1).start);
            // Groups 2..5 of a plane are one contiguous range made of exactly those groups.
            let r = t.groups_range(l, 1, 2..5);
            let parts: u64 = (2..5)
                .map(|g| {
                    let x = t.groups_range(l, 1, g..g + 1);
                    x.end - x.start
                })
                .sum();
            assert_eq!(r.end - r.start, parts);
        }
        if let Some(n) = codec.fixed_len(&stored::group_shape(&h.meta, &h.geometry, 1, 0)) {
            let r = t.groups_range(0, 1, 0..1);
            assert_eq!((r.end - r.start) as usize, n);
        }
    }
}

/// The lossless codec shrinks the file of bf16 KV (the dtype it is for: about 1.4x on real KV)
/// and of f16 KV (5-bit exponents leave it less to save: about 1.1x), and both come back byte
/// for byte. The f16 chunk is a whole 256-token chunk: on a few tokens the layers' 4 KiB
/// padding would hide a 1.1x saving.
#[test]
fn lossless_transcodes_back_to_the_identical_raw_file() {
    let mut bf16 = ModelSpec::preset("tiny").unwrap();
    bf16.dtype = Dtype::Bf16;
    let f16 = ModelSpec::preset("tiny").unwrap();
    let whole_f16 = ChunkMeta::for_spec(&f16, None, SaltTag::NONE, (0..256).collect());
    for meta in [meta_of(&bf16), whole_f16] {
        let raw = format::encode_chunk(&meta, kv_fill(&meta)).unwrap();
        let coded = transcode(&raw, Codec::Lossless).unwrap();
        assert!(
            coded.len() < raw.len(),
            "{:?}: {} >= {}",
            meta.dtype,
            coded.len(),
            raw.len()
        );
        ChunkView::parse(&coded, Verify::Full).unwrap();
        assert_eq!(transcode(&coded, Codec::Raw).unwrap(), raw);
    }
    let meta = tiny_meta();
    let raw = format::encode_chunk(&meta, kv_fill(&meta)).unwrap();
    assert!(matches!(
        transcode(&raw, Codec::Fp8),
        Err(FormatError::BadField { field: "codec", .. })
    ));
}

/// Rewrites the header checksum after an edit, so a test reaches the check behind it.
fn reseal(bytes: &mut [u8]) {
    let hl = ChunkHeader::peek_header_len(bytes).unwrap() as usize;
    bytes[216..248].fill(0);
    let sum = blake3::hash(&bytes[..hl]);
    bytes[216..248].copy_from_slice(sum.as_bytes());
}

#[test]
fn bad_coded_chunks_are_typed_errors() {
    let meta = tiny_meta();
    let good = encode(&meta, Codec::Lossless);
    let h = ChunkHeader::parse(&good).unwrap();

    // A codec this build does not know: named by its value.
    let mut unknown = good.clone();
    unknown[20] = 77;
    reseal(&mut unknown);
    let err = ChunkHeader::parse(&unknown).unwrap_err();
    assert!(
        matches!(err, FormatError::UnknownCodec { value: 77 }),
        "{err}"
    );
    assert!(err.to_string().contains("77"));
    // The message lists what this build knows, so a reader sees the chunk is newer than it.
    for c in Codec::ALL {
        assert!(err.to_string().contains(c.name()), "{err}");
    }

    // A coded chunk that claims version 1.
    let mut v1 = good.clone();
    v1[8] = 1;
    reseal(&mut v1);
    assert!(matches!(
        ChunkHeader::parse(&v1),
        Err(FormatError::BadField { field: "codec", .. })
    ));

    // Stored bytes that fail their digest: header checks pass, a full check names the codec.
    let mut flipped = good.clone();
    let at = h.layer_span(1).start as usize + 5;
    flipped[at] ^= 0x40;
    ChunkView::parse(&flipped, Verify::Header).unwrap();
    let err = ChunkView::parse(&flipped, Verify::Full).unwrap_err();
    assert!(
        matches!(
            err,
            FormatError::StoredDigest {
                codec: Codec::Lossless,
                layer: 1
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("lossless"));

    // Every lossy codec's stored bytes are covered by the layer digest too: a flipped code
    // byte of a lossy chunk would decode to other values without an error, so only the full
    // check can catch it, and it does, naming the codec.
    for codec in Codec::ALL.into_iter().filter(|c| !c.is_lossless()) {
        let mut flipped = encode(&meta, codec);
        let fh = ChunkHeader::parse(&flipped).unwrap();
        let at = fh.layer_span(1).start as usize + 100;
        flipped[at] ^= 0x01;
        ChunkView::parse(&flipped, Verify::Header).unwrap();
        let err = ChunkView::parse(&flipped, Verify::Full).unwrap_err();
        assert!(
            matches!(err, FormatError::StoredDigest { codec: c, layer: 1 } if c == codec),
            "{codec}: {err}"
        );
        assert!(err.to_string().contains(codec.name()), "{err}");
    }

    // A group length the codec cannot have.
    let fp8 = encode(&meta, Codec::Fp8);
    let fh = ChunkHeader::parse(&fp8).unwrap();
    let g = &fh.geometry;
    let group_table = g.table_offset as usize + g.num_layers as usize * (2 * 16 + 32);
    let mut bad_len = fp8.clone();
    bad_len[group_table] ^= 1;
    reseal(&mut bad_len);
    assert!(matches!(
        ChunkHeader::parse(&bad_len),
        Err(FormatError::BadField {
            field: "group_len",
            ..
        })
    ));

    // Decoded bytes that do not match the raw digest (a forged raw digest).
    let mut forged = good.clone();
    forged[group_table] ^= 1; // first byte of layer 0's raw digest
    reseal(&mut forged);
    let err = ChunkView::parse(&forged, Verify::Full).unwrap_err();
    assert!(
        matches!(
            err,
            FormatError::DecodedDigest {
                codec: Codec::Lossless,
                layer: 0
            }
        ),
        "{err}"
    );
    assert!(matches!(
        transcode(&forged, Codec::Raw),
        Err(FormatError::DecodedDigest { layer: 0, .. })
    ));

    // Non-zero padding after a layer's stored bytes.
    let mut padded = good.clone();
    let end = h.layer_span(0).end as usize - 1;
    padded[end] = 1;
    assert!(matches!(
        ChunkView::parse(&padded, Verify::Full),
        Err(FormatError::NonZeroPadding { .. })
    ));

    // Truncated or longer files.
    assert!(matches!(
        ChunkView::parse(&good[..good.len() - 4096], Verify::Header),
        Err(FormatError::Truncated { .. })
    ));
}

#[test]
fn file_reader_reads_and_verifies_coded_chunks() {
    let meta = tiny_meta();
    let bytes = encode(&meta, Codec::Kivi4);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(meta.key.file_name());
    std::fs::write(&p, &bytes).unwrap();
    let f = std::fs::File::open(&p).unwrap();
    let h = ChunkHeader::read_from(&f).unwrap();
    assert_eq!(h.codec, Codec::Kivi4);
    h.verify_file_payload(&f).unwrap();
}

/// A coded chunk's planes cannot be borrowed from the file: `plane` is a typed error naming
/// the codec (never a panic on a file read from disk), and `decoded_plane` gives the raw bytes.
#[test]
fn a_coded_chunks_plane_is_decoded_not_borrowed() {
    let spec = ModelSpec::preset("tiny").unwrap();
    let meta = meta_of(&spec);
    let raw = format::encode_chunk(&meta, kv_fill(&meta)).unwrap();
    let raw_view = ChunkView::parse(&raw, Verify::Full).unwrap();
    let bytes = encode(&meta, Codec::Lossless);
    let view = ChunkView::parse(&bytes, Verify::Full).unwrap();
    let e = view.plane(0, 1).unwrap_err();
    assert!(
        matches!(
            e,
            kvfs_loader::FormatError::Coded {
                codec: Codec::Lossless
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("lossless"), "{e}");
    let mut coder = Coder::new();
    let mut scratch = Vec::new();
    let got = view.decoded_plane(&mut coder, 0, 1, &mut scratch).unwrap();
    assert_eq!(got, raw_view.plane(0, 1).unwrap());
    // A raw chunk's decoded plane is the borrowed one.
    let got = raw_view
        .decoded_plane(&mut coder, 0, 1, &mut scratch)
        .unwrap();
    assert_eq!(got, raw_view.plane(0, 1).unwrap());
}

/// A coded chunk carries an importance section (after its codec table): every codec keeps
/// it through encode and parse, the payload decodes as without it, and a lossless
/// transcode (what the remote codec does to every upload) gives back the raw chunk with its
/// section byte for byte, where it used to drop the section.
#[test]
fn coded_chunks_keep_their_importance_section() {
    use kvfs_loader::format::{encode_chunk_coded_with, encode_chunk_with};
    use kvfs_loader::importance::Importance;
    let meta = tiny_meta();
    let g = meta.geometry().unwrap();
    let scores: Vec<f32> = (0..g.num_layers * g.groups())
        .map(|i| 0.25 / (1 + i % 3) as f32)
        .collect();
    let imp = Importance::new(g.num_layers, g.groups(), 24, scores).unwrap();
    for codec in Codec::ALL {
        let with = encode_chunk_coded_with(&meta, codec, Some(&imp), kv_fill(&meta)).unwrap();
        let without = encode(&meta, codec);
        let v = ChunkView::parse(&with, Verify::Full).unwrap();
        assert_eq!(v.header.codec, codec);
        assert_eq!(v.header.importance.as_ref(), Some(&imp), "{codec}");
        assert_eq!(u16::from_le_bytes([with[8], with[9]]), 2, "{codec}");
        if codec != Codec::Raw {
            assert_eq!(decoded_planes(&with), decoded_planes(&without), "{codec}");
        }
    }
    let raw = encode_chunk_with(&meta, Some(&imp), kv_fill(&meta)).unwrap();
    let coded = transcode(&raw, Codec::Lossless).unwrap();
    let h = ChunkHeader::parse(&coded).unwrap();
    assert_eq!(
        (h.codec, h.importance.as_ref()),
        (Codec::Lossless, Some(&imp))
    );
    assert_eq!(transcode(&coded, Codec::Raw).unwrap(), raw);

    // A section of the wrong shape is refused for a coded chunk as for a raw one.
    let wrong = Importance::new(g.num_layers + 1, g.groups(), 1, vec![0.1; 3 * 2]).unwrap();
    let e = encode_chunk_coded_with(&meta, Codec::Int8, Some(&wrong), kv_fill(&meta)).unwrap_err();
    assert!(
        matches!(
            e,
            FormatError::BadField {
                field: "importance",
                ..
            }
        ),
        "{e}"
    );
    // A damaged section of a coded chunk is a typed error, as for a raw one: the score of
    // group 0 of layer 0 set above 1.
    let mut bad = encode_chunk_coded_with(&meta, Codec::Int8, Some(&imp), kv_fill(&meta)).unwrap();
    let hl = ChunkHeader::peek_header_len(&bad).unwrap() as usize;
    let section = g.table_offset as usize
        + g.num_layers as usize * (2 * 16 + 32)
        + 4 * (g.num_layers * 2 * g.groups()) as usize;
    assert!(section + 12 <= hl);
    bad[section + 8..section + 12].copy_from_slice(&2.0f32.to_le_bytes());
    reseal(&mut bad);
    assert!(matches!(
        ChunkHeader::parse(&bad),
        Err(FormatError::BadField {
            field: "importance",
            ..
        })
    ));
}
