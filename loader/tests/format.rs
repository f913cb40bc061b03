//! The `.kvc` format: golden bytes, round trips and corruption detection.

use kvfs_loader::format::{self, ALIGN, ChunkHeader, ChunkView, Verify, encode_chunk, synth_fill};
use kvfs_loader::{ChunkKey, ChunkMeta, Dtype, FormatError, KvKind, ModelSpec, SaltTag};
use proptest::prelude::*;

fn tiny_meta() -> ChunkMeta {
    let spec = ModelSpec::preset("tiny").unwrap();
    let parent = ChunkKey::derive(&spec.namespace_id(), None, &SaltTag::NONE, &[9, 8, 7]);
    ChunkMeta::for_spec(
        &spec,
        Some(parent),
        SaltTag::of(b"golden"),
        (100..132).collect(),
    )
}

/// Golden bytes: the digest of a fixed chunk and its first header bytes. A change to the
/// format must bump `format::VERSION` and update docs/FORMAT.md along with these values.
#[test]
fn golden_bytes() {
    let meta = tiny_meta();
    let bytes = encode_chunk(&meta, |l, p, dst| synth_fill(&meta.key, l, p, dst)).unwrap();
    assert_eq!(
        u16::from_le_bytes([bytes[8], bytes[9]]),
        format::VERSION_1,
        "a chunk without version-2 features is written as version 1"
    );
    assert_eq!(format::VERSION_1, 1);
    assert_eq!(
        bytes.len(),
        4096 + 2 * 2 * 8192,
        "tiny chunk: one header page, 4 extents of 32 tokens x 256 bytes"
    );
    let head_hex: String = bytes[..48].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(head_hex, GOLDEN_HEAD);
    assert_eq!(blake3::hash(&bytes).to_hex().as_str(), GOLDEN_FILE_DIGEST);
}

const GOLDEN_HEAD: &str = "4b56465343484e4b01000101001000000100000000000000020000000200000040000000200000001000000000000000";
const GOLDEN_FILE_DIGEST: &str = "36a9fd5a52b02f4819bcd8a7f9a6e2216e5e5ecd89e6621d492c828dfb013b3f";

#[test]
fn extents_are_aligned_and_token_major() {
    let spec = ModelSpec::preset("llama-3-8b").unwrap();
    let meta = ChunkMeta::for_spec(&spec, None, SaltTag::NONE, (0..256).collect());
    let g = meta.geometry().unwrap();
    assert_eq!(g.header_len, 4096);
    assert_eq!(g.extent_len, 256 * 8 * 128 * 2);
    for l in 0..g.num_layers {
        for p in 0..2 {
            assert_eq!(g.extent(l, p).start % ALIGN, 0);
        }
    }
    // one 16-token group is one contiguous, aligned range
    let r = g.token_range(3, 1, g.group_tokens_range(2));
    assert_eq!(r.start % ALIGN, 0);
    assert_eq!(r.end - r.start, 16 * 8 * 128 * 2);
    assert_eq!(g.file_len, 4096 + 32 * 2 * 512 * 1024);
}

fn corrupt(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at] ^= 0x40;
    b
}

#[test]
fn typed_errors_for_bad_files() {
    let meta = tiny_meta();
    let good = encode_chunk(&meta, |l, p, dst| synth_fill(&meta.key, l, p, dst)).unwrap();
    ChunkView::parse(&good, Verify::Full).unwrap();

    assert!(matches!(
        ChunkView::parse(&good[..100], Verify::Header),
        Err(FormatError::Truncated { .. })
    ));
    assert!(matches!(
        ChunkView::parse(&good[..5000], Verify::Header),
        Err(FormatError::Truncated { .. })
    ));
    assert!(matches!(
        ChunkView::parse(&corrupt(&good, 0), Verify::Header),
        Err(FormatError::BadMagic { .. })
    ));
    // version 2 is read since issue 14; the next unknown version is refused
    let mut v3 = good.clone();
    v3[8] = 3;
    assert!(matches!(
        ChunkView::parse(&v3, Verify::Header),
        Err(FormatError::UnsupportedVersion { found: 3, .. })
    ));
    assert!(matches!(
        ChunkView::parse(&corrupt(&good, 300), Verify::Header),
        Err(FormatError::HeaderChecksum)
    ));
    // payload corruption passes a header-only check and fails a full one
    let bad_payload = corrupt(&good, 4096 + 10);
    ChunkView::parse(&bad_payload, Verify::Header).unwrap();
    assert!(matches!(
        ChunkView::parse(&bad_payload, Verify::Full),
        Err(FormatError::PayloadDigest { layer: 0 })
    ));
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 4096]);
    assert!(matches!(
        ChunkView::parse(&longer, Verify::Header),
        Err(FormatError::SizeMismatch { .. })
    ));
    // non-zero padding after an extent (tiny extents are exactly 4 KiB, so use a larger one)
    let spec = ModelSpec::new("pad", Dtype::F16, 1, 1, 24);
    let m = ChunkMeta::for_spec(&spec, None, SaltTag::NONE, vec![1, 2, 3]);
    let b = encode_chunk(&m, |_, _, d| d.fill(1)).unwrap();
    let g = m.geometry().unwrap();
    let padded = corrupt(&b, g.extent(0, 0).end as usize + 1);
    assert!(matches!(
        ChunkView::parse(&padded, Verify::Full),
        Err(FormatError::NonZeroPadding { .. })
    ));
}

#[test]
fn forged_key_is_rejected() {
    let mut meta = tiny_meta();
    meta.key = ChunkKey([7; 32]);
    assert!(matches!(
        encode_chunk(&meta, |_, _, _| {}),
        Err(FormatError::KeyMismatch { .. })
    ));
}

#[test]
fn mla_chunks_have_one_plane() {
    let spec = ModelSpec::preset("deepseek-v2-lite").unwrap();
    let (meta, bytes) =
        format::synth_chunk(&spec, None, SaltTag::NONE, (0..256).collect()).unwrap();
    let v = ChunkView::parse(&bytes, Verify::Full).unwrap();
    assert_eq!(v.header.geometry.planes, 1);
    assert_eq!(v.header.meta.kv_kind, KvKind::MlaLatent);
    assert_eq!(v.plane(26, 0).unwrap().len(), 256 * 576 * 2);
    assert_eq!(meta.key, v.header.key());
}

#[test]
fn file_reader_reads_header_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ModelSpec::new("big-header", Dtype::F16, 40, 2, 16);
    // 2000 tokens: the header (8 KB of token ids) spans more than one page
    let (meta, bytes) =
        format::synth_chunk(&spec, None, SaltTag::NONE, (0..2000).collect()).unwrap();
    assert!(meta.geometry().unwrap().header_len > ALIGN);
    let path = dir.path().join("c.kvc");
    std::fs::write(&path, &bytes).unwrap();
    let f = std::fs::File::open(&path).unwrap();
    let h = ChunkHeader::read_from(&f).unwrap();
    assert_eq!(h.meta, meta);
    h.verify_file_payload(&f).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
    let f = std::fs::File::open(&path).unwrap();
    assert!(matches!(
        ChunkHeader::read_from(&f),
        Err(FormatError::Truncated { .. })
    ));
}

fn arb_meta() -> impl Strategy<Value = ChunkMeta> {
    (
        prop::sample::select(Dtype::ALL.to_vec()),
        prop::bool::ANY,
        1u32..6,
        1u32..5,
        1u32..80,
        1u32..300,
        1u32..40,
        prop::option::of(any::<[u8; 32]>()),
        any::<Vec<u8>>(),
    )
        .prop_map(
            |(dtype, mla, layers, heads, dim, ntok, group, parent, salt)| {
                let mut spec =
                    ModelSpec::new("prop", dtype, layers, if mla { 1 } else { heads }, dim);
                spec.kv_kind = if mla {
                    KvKind::MlaLatent
                } else {
                    KvKind::KeyValue
                };
                spec.group_tokens = group;
                let tokens = (0..ntok).map(|i| i.wrapping_mul(7919) % 50000).collect();
                ChunkMeta::for_spec(&spec, parent.map(ChunkKey), SaltTag::of(&salt), tokens)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn round_trip(meta in arb_meta()) {
        let bytes = encode_chunk(&meta, |l, p, dst| synth_fill(&meta.key, l, p, dst)).unwrap();
        prop_assert_eq!(bytes.len() as u64 % ALIGN, 0);
        let v = ChunkView::parse(&bytes, Verify::Full).unwrap();
        prop_assert_eq!(&v.header.meta, &meta);
        let g = v.header.geometry;
        for l in 0..g.num_layers {
            for p in 0..g.planes {
                let mut expect = vec![0u8; g.extent_len as usize];
                synth_fill(&meta.key, l, p, &mut expect);
                prop_assert_eq!(v.plane(l, p).unwrap(), &expect[..]);
            }
        }
    }

    /// Any single flipped byte anywhere in the file is caught by a full check.
    #[test]
    fn any_flipped_byte_is_caught(meta in arb_meta(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let bytes = encode_chunk(&meta, |l, p, dst| synth_fill(&meta.key, l, p, dst)).unwrap();
        let mut b = bytes.clone();
        let at = pos.index(b.len());
        b[at] ^= 1 << bit;
        prop_assert!(ChunkView::parse(&b, Verify::Full).is_err(), "flip at {} not caught", at);
    }
}

/// A header that claims a huge length is refused from its first bytes, before a reader
/// allocates the header (it used to be taken up to 4 GiB).
#[test]
fn a_huge_header_len_is_refused_before_allocation() {
    let meta = tiny_meta();
    let bytes = encode_chunk(&meta, |l, p, dst| synth_fill(&meta.key, l, p, dst)).unwrap();
    let biggest = meta_with_most_of_everything();
    assert!(biggest <= format::MAX_HEADER_LEN, "{biggest}");
    for claimed in [format::MAX_HEADER_LEN + ALIGN, 0xffff_f000] {
        let mut b = bytes[..format::FIXED_HEADER_LEN].to_vec();
        b[OFF_HEADER_LEN..OFF_HEADER_LEN + 4].copy_from_slice(&(claimed as u32).to_le_bytes());
        let e = ChunkHeader::peek_header_len(&b).unwrap_err();
        assert!(e.to_string().contains("header_len"), "{claimed}: {e}");
    }
}

/// `header_len` of the largest chunk the format allows.
fn meta_with_most_of_everything() -> u64 {
    let mut spec = ModelSpec::preset("tiny").unwrap();
    spec.num_layers = format::MAX_LAYERS;
    spec.chunk_tokens = format::MAX_CHUNK_TOKENS;
    let meta = ChunkMeta::for_spec(
        &spec,
        None,
        SaltTag::NONE,
        vec![1; format::MAX_CHUNK_TOKENS as usize],
    );
    meta.geometry().unwrap().header_len
}

/// Offset of `header_len` in the fixed header (docs/FORMAT.md).
const OFF_HEADER_LEN: usize = 12;

fn independent_meta() -> ChunkMeta {
    let spec = ModelSpec::preset("tiny").unwrap();
    ChunkMeta::independent(&spec, SaltTag::of(b"golden"), (200..220).collect(), 777)
}

/// Golden bytes of a version-2 position-independent chunk (flags bit 1, origin at offset 44,
/// its own key derivation). Fixed like the version-1 golden bytes.
#[test]
fn golden_bytes_independent_v2() {
    let meta = independent_meta();
    let bytes = encode_chunk(&meta, |l, p, dst| synth_fill(&meta.key, l, p, dst)).unwrap();
    assert_eq!(format::VERSION, 2);
    assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 2);
    assert_eq!(
        u32::from_le_bytes(bytes[16..20].try_into().unwrap()),
        format::FLAG_INDEPENDENT
    );
    assert_eq!(u32::from_le_bytes(bytes[44..48].try_into().unwrap()), 777);
    let head_hex: String = bytes[..48].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(head_hex, GOLDEN_IND_HEAD);
    assert_eq!(
        blake3::hash(&bytes).to_hex().as_str(),
        GOLDEN_IND_FILE_DIGEST
    );
    let view = ChunkView::parse(&bytes, Verify::Full).unwrap();
    assert_eq!(view.header.meta, meta);
    assert_eq!(view.header.meta.origin, Some(777));
    assert_eq!(view.header.meta.parent, None);
}

const GOLDEN_IND_HEAD: &str = "4b56465343484e4b02000101001000000200000000000000020000000200000040000000140000001000000009030000";
const GOLDEN_IND_FILE_DIGEST: &str =
    "03570816a942f755b876c230b05d5b6f1ec0b01c0ebd5a64632a0f46e499e937";

/// Rewrites a header field and fixes the header checksum, so the check under test is the one
/// that fires (a forger can always recompute the checksum).
fn forge(bytes: &[u8], at: usize, value: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at..at + value.len()].copy_from_slice(value);
    let header_len = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    b[216..248].fill(0);
    let sum = blake3::hash(&b[..header_len]);
    b[216..248].copy_from_slice(sum.as_bytes());
    b
}

#[test]
fn version_2_fields_are_checked() {
    let meta = independent_meta();
    let good = encode_chunk(&meta, |l, p, dst| synth_fill(&meta.key, l, p, dst)).unwrap();
    let bad_field = |b: &[u8], field: &str| match ChunkView::parse(b, Verify::Header) {
        Err(FormatError::BadField { field: f, .. }) => assert_eq!(f, field),
        other => panic!("expected BadField({field}), got {other:?}"),
    };
    // The independent flag in a version-1 file: unknown in version 1.
    bad_field(&forge(&good, 8, &1u16.to_le_bytes()), "flags");
    // Independent and has-parent at once.
    bad_field(&forge(&good, 16, &3u32.to_le_bytes()), "flags");
    // A version-2 file that uses no version-2 feature must have been written as version 1.
    let v1 = encode_chunk(&tiny_meta(), |_, _, d| d.fill(0)).unwrap();
    bad_field(&forge(&v1, 8, &2u16.to_le_bytes()), "version");
    // Offset 44 is reserved unless the chunk is independent.
    bad_field(&forge(&v1, 44, &5u32.to_le_bytes()), "reserved");
    // The origin is not part of the key; the tokens are.
    let moved = forge(&good, 44, &0u32.to_le_bytes());
    assert_eq!(
        ChunkView::parse(&moved, Verify::Header)
            .unwrap()
            .header
            .meta
            .origin,
        Some(0)
    );
    assert!(matches!(
        ChunkView::parse(&forge(&good, 248, &5u32.to_le_bytes()), Verify::Header),
        Err(FormatError::KeyMismatch { .. })
    ));
    // A meta with both a parent and an origin cannot be encoded.
    let mut both = independent_meta();
    both.parent = Some(ChunkKey([1; 32]));
    assert!(matches!(
        encode_chunk(&both, |_, _, d| d.fill(0)),
        Err(FormatError::BadField { field: "flags", .. })
    ));
}

// ---- Format version 2, importance (issue 14): golden bytes of a chunk with an importance
// section, version compatibility, and typed errors for bad sections.

use kvfs_loader::format::{FLAG_IMPORTANCE, encode_chunk_with};
use kvfs_loader::importance::Importance;

/// Two layers x two 16-token groups.
fn tiny_importance() -> Importance {
    Importance::new(2, 2, 32, vec![0.75, 0.125, 0.5, 0.25]).unwrap()
}

fn encode_v2(meta: &ChunkMeta, imp: &Importance) -> Vec<u8> {
    encode_chunk_with(meta, Some(imp), |l, p, dst| {
        synth_fill(&meta.key, l, p, dst)
    })
    .unwrap()
}

const OFF_VERSION: usize = 8;
const OFF_FLAGS: usize = 16;
const OFF_CHECKSUM: usize = 216;

/// Rewrites the header checksum after a deliberate change (a forged but consistent header).
fn reseal(bytes: &mut [u8]) {
    let header_len = ChunkHeader::peek_header_len(bytes).unwrap() as usize;
    bytes[OFF_CHECKSUM..OFF_CHECKSUM + 32].fill(0);
    let sum = *blake3::hash(&bytes[..header_len]).as_bytes();
    bytes[OFF_CHECKSUM..OFF_CHECKSUM + 32].copy_from_slice(&sum);
}

/// Golden bytes of a version-2 chunk: the fixed header's first bytes (version 2, flags 0b101)
/// and the whole file's digest. Changing the section's layout must fail here.
#[test]
fn golden_bytes_v2() {
    let meta = tiny_meta();
    let bytes = encode_v2(&meta, &tiny_importance());
    assert_eq!(format::VERSION, 2);
    assert_eq!(
        bytes.len(),
        4096 + 2 * 2 * 8192,
        "the section fits the first page"
    );
    let head_hex: String = bytes[..48].iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(head_hex, GOLDEN_HEAD_V2);
    assert_eq!(
        blake3::hash(&bytes).to_hex().as_str(),
        GOLDEN_FILE_DIGEST_V2
    );
    // the section: right after the layer table (248 + 32 * 4 token bytes, then 2 x 96)
    let at = 248 + 32 * 4 + 2 * (2 * 16 + 32);
    assert_eq!(&bytes[at..at + 4], &32u32.to_le_bytes());
    assert_eq!(&bytes[at + 8..at + 12], &0.75f32.to_le_bytes());
    assert_eq!(&bytes[at + 20..at + 24], &0.25f32.to_le_bytes());
}

const GOLDEN_HEAD_V2: &str = "4b56465343484e4b02000101001000000500000000000000020000000200000040000000200000001000000000000000";
const GOLDEN_FILE_DIGEST_V2: &str =
    "023847d2e7226924ba36fad7c1eb26c1ae2810cbe3063f227d206905c21bb5ac";

#[test]
fn v1_without_importance_v2_with_it() {
    let meta = tiny_meta();
    let v1 = encode_chunk(&meta, |l, p, dst| synth_fill(&meta.key, l, p, dst)).unwrap();
    let h1 = ChunkView::parse(&v1, Verify::Full).unwrap().header;
    assert_eq!((h1.version, h1.importance.is_none()), (1, true));

    let v2 = encode_v2(&meta, &tiny_importance());
    let h2 = ChunkView::parse(&v2, Verify::Full).unwrap().header;
    assert_eq!(h2.version, 2);
    assert_eq!(h2.importance, Some(tiny_importance()));
    assert_eq!(h2.importance.as_ref().unwrap().layer(1), &[0.5, 0.25]);
    // the payload and its digests are the same bytes: importance lives in the header only
    assert_eq!(h1.payload_digest, h2.payload_digest);
    assert_eq!(v1[4096..], v2[4096..]);

    // read from a file: the header alone
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.kvc");
    std::fs::write(&path, &v2).unwrap();
    let h = ChunkHeader::read_from(&std::fs::File::open(&path).unwrap()).unwrap();
    assert_eq!(h.importance, Some(tiny_importance()));
}

/// A big section moves the payload: the header grows by whole pages and extents follow it.
#[test]
fn a_large_section_grows_the_header() {
    let spec = ModelSpec::preset("llama-3-8b").unwrap();
    let meta = ChunkMeta::for_spec(&spec, None, SaltTag::NONE, (0..256).collect());
    let groups = 16;
    let scores = vec![1.0 / 32.0; 32 * groups];
    let imp = Importance::new(32, groups as u32, 8, scores).unwrap();
    let bytes = encode_chunk_with(&meta, Some(&imp), |_, _, d| d.fill(3)).unwrap();
    let h = ChunkView::parse(&bytes, Verify::Full).unwrap().header;
    // 248 + 1024 token bytes + 32 x 64 table + 8 + 2048 scores = 5376 -> 8192
    assert_eq!(h.geometry.header_len, 8192);
    assert_eq!(h.geometry.extent(0, 0).start, 8192);
    assert_eq!(h.importance, Some(imp));
}

#[test]
fn bad_sections_are_typed_errors() {
    let meta = tiny_meta();
    let good = encode_v2(&meta, &tiny_importance());
    let section = 248 + 32 * 4 + 2 * (2 * 16 + 32);

    // bit rot in a score: the header checksum covers the section
    let mut rot = good.clone();
    rot[section + 9] ^= 0x10;
    assert!(matches!(
        ChunkView::parse(&rot, Verify::Header),
        Err(FormatError::HeaderChecksum)
    ));

    // a forged score outside [0, 1]
    let mut nan = good.clone();
    nan[section + 8..section + 12].copy_from_slice(&f32::NAN.to_le_bytes());
    reseal(&mut nan);
    let e = ChunkView::parse(&nan, Verify::Header).unwrap_err();
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

    // importance flag on a version-1 file: v1 has no such bit
    let mut v1_flag = good.clone();
    v1_flag[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&1u16.to_le_bytes());
    reseal(&mut v1_flag);
    let e = ChunkView::parse(&v1_flag, Verify::Header).unwrap_err();
    assert!(
        matches!(e, FormatError::BadField { field: "flags", .. }),
        "{e}"
    );

    // flag cleared but section bytes left: they are non-zero padding
    let mut no_flag = good.clone();
    let flags = u32::from_le_bytes(no_flag[OFF_FLAGS..OFF_FLAGS + 4].try_into().unwrap());
    no_flag[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&(flags & !FLAG_IMPORTANCE).to_le_bytes());
    reseal(&mut no_flag);
    // still version 2 without any version-2 feature: refused
    let e = ChunkView::parse(&no_flag, Verify::Header).unwrap_err();
    assert!(
        matches!(
            e,
            FormatError::BadField {
                field: "version",
                ..
            }
        ),
        "{e}"
    );
    // as version 1, the section's bytes are non-zero padding
    no_flag[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&1u16.to_le_bytes());
    reseal(&mut no_flag);
    assert!(matches!(
        ChunkView::parse(&no_flag, Verify::Header),
        Err(FormatError::NonZeroPadding { .. })
    ));

    // an unknown version
    let mut v3 = good.clone();
    v3[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&3u16.to_le_bytes());
    assert!(matches!(
        ChunkView::parse(&v3, Verify::Header),
        Err(FormatError::UnsupportedVersion { found: 3, .. })
    ));

    // a writer given importance of the wrong shape refuses
    let wrong = Importance::new(3, 2, 1, vec![0.1; 6]).unwrap();
    let e = encode_chunk_with(&meta, Some(&wrong), |_, _, _| {}).unwrap_err();
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
}
