//! Documents as position-independent chunks: stored from engine memory at one place, loaded
//! at another with the keys re-encoded for the new positions, V untouched; typed errors for a
//! missing chunk, a spec whose RoPE cannot be re-encoded and mismatched RoPE parameters; a
//! corrupt chunk refused before its bytes reach the blocks; a coded document decoded and
//! rotated on the loader's load path.

use kvfs_loader::codec::Codec;
use kvfs_loader::layout::{BlockMap, KvLayout, RawRegion};
use kvfs_loader::loader::{ChunkError, Dest, Loader, LoaderError, LoaderOptions};
use kvfs_loader::{ChunkView, Dtype, ModelSpec, RopePairing, RopeParams, Verify};

const HEADS: usize = 2;
const DIM: usize = 32;
const LAYERS: usize = 2;
const BLOCK: usize = 16;

fn spec() -> ModelSpec {
    let mut s = ModelSpec::new(
        "kvfs/document-test",
        Dtype::F32,
        LAYERS as u32,
        HEADS as u32,
        DIM as u32,
    );
    s.chunk_tokens = 16;
    s.group_tokens = 4;
    s.rope_theta = 10000.0;
    s
}

/// Paged f32 memory in vLLM's flash-attn layout with a reversed block table.
struct Mem {
    bufs: Vec<Vec<f32>>,
    table: Vec<u32>,
    blocks: usize,
}

impl Mem {
    fn new(tokens: usize) -> Mem {
        let blocks = tokens.div_ceil(BLOCK);
        Mem {
            bufs: vec![vec![f32::NAN; 2 * blocks * BLOCK * HEADS * DIM]; LAYERS],
            table: (0..blocks as u32).rev().collect(),
            blocks,
        }
    }
    fn layout(&mut self) -> KvLayout {
        let regions: Vec<_> = self
            .bufs
            .iter_mut()
            .map(|b| RawRegion::new(b.as_mut_ptr().cast(), b.len() * 4))
            .collect();
        // SAFETY: the buffers outlive every load and store of the test, and nothing else
        // touches them meanwhile.
        unsafe {
            KvLayout::vllm_flash_attn(
                &regions,
                self.blocks,
                BLOCK,
                HEADS as u32,
                DIM as u32,
                Dtype::F32,
            )
        }
        .unwrap()
    }
    fn row(&mut self, layer: usize, plane: usize, pos: usize) -> &mut [f32] {
        let row = HEADS * DIM;
        let slot = self.table[pos / BLOCK] as usize * BLOCK + pos % BLOCK;
        let off = plane * self.blocks * BLOCK * row + slot * row;
        &mut self.bufs[layer][off..off + row]
    }
}

/// The "unrotated key" of a token in a layer, and its value row.
fn raw(token: u32, layer: usize, plane: usize) -> Vec<f32> {
    (0..HEADS * DIM)
        .map(|i| ((token as usize * 31 + i * 7 + layer * 3 + plane) % 41) as f32 / 10.0 - 2.0)
        .collect()
}

fn rope() -> RopeParams {
    RopeParams::from_spec(&spec(), RopePairing::HalfSplit).unwrap()
}

/// K as the model has it at `pos`: the raw key rotated by `pos`.
fn key_at(token: u32, layer: usize, pos: usize) -> Vec<f32> {
    let mut k = raw(token, layer, 0);
    rope().rotate_f32(&mut k, pos as i64).unwrap();
    k
}

#[test]
fn a_document_stored_at_one_place_loads_at_another() {
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::open(dir.path(), spec(), b"").unwrap();
    let doc: Vec<u32> = (0..40).map(|i| 1000 + i * 13).collect();
    let (from, to) = (5usize, 100usize);
    let mut src = Mem::new(from + doc.len());
    for (i, &t) in doc.iter().enumerate() {
        for l in 0..LAYERS {
            src.row(l, 0, from + i)
                .copy_from_slice(&key_at(t, l, from + i));
            src.row(l, 1, from + i).copy_from_slice(&raw(t, l, 1));
        }
    }
    assert!(!loader.lookup_document(&doc));
    let layout = src.layout();
    let table = src.table.clone();
    let stats = loader
        .store_document(&doc, &Dest::host(&layout, BlockMap::Blocks(&table)), from)
        .unwrap();
    assert_eq!((stats.written, stats.present), (3, 0), "16 + 16 + 8 tokens");
    assert!(loader.lookup_document(&doc));
    // The chunks are independent, v2, and remember where they were computed.
    let chunks = loader.document_chunks(&doc);
    for c in &chunks {
        let bytes = std::fs::read(loader.chunk_path(&c.key)).unwrap();
        let view = ChunkView::parse(&bytes, Verify::Full).unwrap();
        assert_eq!(view.header.meta.origin, Some((from + c.start) as u32));
        assert_eq!(view.header.meta.parent, None);
    }
    // Stored again: nothing new.
    let again = loader
        .store_document(&doc, &Dest::host(&layout, BlockMap::Blocks(&table)), from)
        .unwrap();
    assert_eq!((again.written, again.present), (0, 3));

    let mut dst = Mem::new(to + doc.len());
    let layout = dst.layout();
    let table = dst.table.clone();
    let load = loader
        .load_document(
            &doc,
            to,
            &rope(),
            &Dest::host(&layout, BlockMap::Blocks(&table)),
        )
        .unwrap();
    assert_eq!((load.chunks, load.tokens), (3, 40));
    for (i, &t) in doc.iter().enumerate() {
        for l in 0..LAYERS {
            let want = key_at(t, l, to + i);
            let got = dst.row(l, 0, to + i).to_vec();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "layer {l} token {i}: K {g} vs {w}");
            }
            assert_eq!(dst.row(l, 1, to + i), &raw(t, l, 1)[..], "V is not rotated");
        }
    }
    // Nothing outside the document's positions was written.
    assert!(dst.row(0, 0, to - 1).iter().all(|x| x.is_nan()));

    // A missing middle chunk: a typed error saying what is valid.
    std::fs::remove_file(loader.chunk_path(&chunks[1].key)).unwrap();
    assert!(!loader.lookup_document(&doc));
    match loader.load_document(
        &doc,
        to,
        &rope(),
        &Dest::host(&layout, BlockMap::Blocks(&table)),
    ) {
        Err(LoaderError::Chunk {
            chunk: 1,
            valid_tokens,
            source,
            ..
        }) => {
            assert_eq!(valid_tokens, to..to + 16);
            assert!(matches!(*source, ChunkError::Missing));
        }
        other => panic!("expected a missing chunk, got {other:?}"),
    }
}

#[test]
fn typed_errors_for_rope_and_requests() {
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::open(dir.path(), spec(), b"").unwrap();
    let mut mem = Mem::new(64);
    let layout = mem.layout();
    let table = mem.table.clone();
    let dest = Dest::host(&layout, BlockMap::Blocks(&table));
    // RoPE parameters of another spec.
    let mut other = spec();
    other.rope_theta = 500000.0;
    let wrong = RopeParams::from_spec(&other, RopePairing::HalfSplit).unwrap();
    assert!(matches!(
        loader.load_document(&[1, 2, 3], 0, &wrong, &dest),
        Err(LoaderError::Invalid(m)) if m.contains("RoPE")
    ));
    assert!(matches!(
        loader.load_document(&[], 0, &rope(), &dest),
        Err(LoaderError::Invalid(_))
    ));
    assert!(matches!(
        loader.store_document(&[], &dest, 0),
        Err(LoaderError::Invalid(_))
    ));
    // Past the destination's blocks.
    assert!(matches!(
        loader.load_document(&[1; 10], 60, &rope(), &dest),
        Err(LoaderError::Layout(_))
    ));
    // A spec with scaling that is not a plain rotation refuses blending.
    let mut yarn = spec();
    yarn.rope_scaling = "yarn:4".into();
    assert!(RopeParams::from_spec(&yarn, RopePairing::HalfSplit).is_err());
}

/// `doc` stored from memory where it sat at `from` (K as the model has it there).
fn store_at(loader: &Loader, doc: &[u32], from: usize) {
    let mut src = Mem::new(from + doc.len());
    for (i, &t) in doc.iter().enumerate() {
        for l in 0..LAYERS {
            src.row(l, 0, from + i)
                .copy_from_slice(&key_at(t, l, from + i));
            src.row(l, 1, from + i).copy_from_slice(&raw(t, l, 1));
        }
    }
    let layout = src.layout();
    let table = src.table.clone();
    loader
        .store_document(doc, &Dest::host(&layout, BlockMap::Blocks(&table)), from)
        .unwrap();
}

#[test]
fn a_corrupt_document_chunk_is_refused_before_its_bytes_reach_the_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LoaderOptions {
        verify: Verify::Full,
        ..Default::default()
    };
    let loader = Loader::open_with(dir.path(), spec(), b"", opts).unwrap();
    let doc: Vec<u32> = (0..40).map(|i| 2000 + i * 7).collect();
    let (from, to) = (3usize, 50usize);
    store_at(&loader, &doc, from);
    // One byte of chunk 1's layer-1 keys flipped on disk: its header still parses.
    let chunks = loader.document_chunks(&doc);
    let path = loader.chunk_path(&chunks[1].key);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = ChunkView::parse(&bytes, Verify::Header)
        .unwrap()
        .header
        .geometry
        .token_range(1, 0, 0..16)
        .start as usize
        + 5;
    bytes[at] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();

    let mut dst = Mem::new(to + doc.len());
    let layout = dst.layout();
    let table = dst.table.clone();
    match loader.load_document(
        &doc,
        to,
        &rope(),
        &Dest::host(&layout, BlockMap::Blocks(&table)),
    ) {
        Err(LoaderError::Chunk {
            chunk: 1,
            valid_tokens,
            source,
            ..
        }) => {
            assert_eq!(
                valid_tokens,
                to..to + 16,
                "chunk 0 is valid, chunk 1 is not"
            );
            assert!(matches!(*source, ChunkError::Format(_)), "{source}");
        }
        other => panic!("expected a corrupt chunk, got {other:?}"),
    }
    // The corrupt layer of chunk 1 never reached the blocks, neither K nor V.
    for pos in to + 16..to + 32 {
        for plane in 0..2 {
            assert!(
                dst.row(1, plane, pos).iter().all(|x| x.is_nan()),
                "position {pos} plane {plane} of the corrupt layer was written"
            );
        }
    }
    // What the error calls valid is valid: chunk 0, rotated.
    for (i, &t) in doc[..16].iter().enumerate() {
        for l in 0..LAYERS {
            let want = key_at(t, l, to + i);
            for (g, w) in dst.row(l, 0, to + i).iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "layer {l} token {i}: K {g} vs {w}");
            }
        }
    }

    // A chunk whose header is damaged is refused whole under the default verification too.
    let loader = Loader::open(dir.path(), spec(), b"").unwrap();
    bytes[at] ^= 0x40;
    bytes[50] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let mut dst = Mem::new(to + doc.len());
    let layout = dst.layout();
    let table = dst.table.clone();
    let err = loader
        .load_document(
            &doc,
            to,
            &rope(),
            &Dest::host(&layout, BlockMap::Blocks(&table)),
        )
        .unwrap_err();
    assert!(matches!(&err, LoaderError::Chunk { chunk: 1, .. }), "{err}");
    for pos in to + 16..to + 32 {
        for l in 0..LAYERS {
            assert!(dst.row(l, 0, pos).iter().all(|x| x.is_nan()));
        }
    }
}

#[test]
fn a_coded_document_is_decoded_and_its_keys_rotated_on_the_load_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec();
    s.codec = Codec::Lossless;
    let loader = Loader::open(dir.path(), s.clone(), b"").unwrap();
    let doc: Vec<u32> = (0..40).map(|i| 3000 + i * 11).collect();
    let (from, to) = (0usize, 70usize);
    store_at(&loader, &doc, from);
    let bytes = std::fs::read(loader.chunk_path(&loader.document_chunks(&doc)[0].key)).unwrap();
    assert_eq!(
        ChunkView::parse(&bytes, Verify::Full).unwrap().header.codec,
        Codec::Lossless
    );
    let mut dst = Mem::new(to + doc.len());
    let layout = dst.layout();
    let table = dst.table.clone();
    let stats = loader
        .load_document(
            &doc,
            to,
            &rope(),
            &Dest::host(&layout, BlockMap::Blocks(&table)),
        )
        .unwrap();
    assert_eq!((stats.chunks, stats.tokens), (3, 40));
    assert_eq!(
        stats.layer_ready.len(),
        LAYERS,
        "the loader's per-layer progress"
    );
    for (i, &t) in doc.iter().enumerate() {
        for l in 0..LAYERS {
            let want = key_at(t, l, to + i);
            for (g, w) in dst.row(l, 0, to + i).iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "layer {l} token {i}: K {g} vs {w}");
            }
            assert_eq!(dst.row(l, 1, to + i), &raw(t, l, 1)[..]);
        }
    }
}
