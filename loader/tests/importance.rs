//! Format version 2, importance (issue 14): golden bytes of a chunk with an importance
//! section, version compatibility, and typed errors for bad sections.

use kvfs_loader::format::{
    self, ChunkHeader, ChunkView, FLAG_IMPORTANCE, Verify, encode_chunk, encode_chunk_with,
    synth_fill,
};
use kvfs_loader::importance::Importance;
use kvfs_loader::{ChunkKey, ChunkMeta, FormatError, ModelSpec, SaltTag};

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
