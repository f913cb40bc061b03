//! The loader on a real `kvfs mount`: store through the mount (create, write, close checked by
//! the mount), look up, and load with O_DIRECT from the backing files the mount names in
//! `user.kvfs.backing`, comparing every row with the source blocks.
//!
//! Needs /dev/fuse and root (fuser mounts without fusermount): see `support/require.rs` (a
//! skip line, or a failure under `KVFS_REQUIRE=fuse`). A guard always unmounts (lazily) and reaps the daemon.

use kvfs_loader::dir::Layout;
use kvfs_loader::layout::{BlockMap, KvLayout, RawRegion};
use kvfs_loader::loader::{Dest, Loader};
use kvfs_loader::{ModelSpec, Verify};

mod support {
    pub mod mount;
    pub mod require;
}

use support::mount::Mount;

/// Host blocks in vLLM flash-attn layout for the `tiny` preset (2 layers, 2 heads, dim 64,
/// f16: 256-byte rows), blocks of 16 tokens.
struct Blocks {
    bufs: Vec<Vec<u8>>,
    layout: KvLayout,
}

fn blocks(num_blocks: usize, fill: impl Fn(usize, usize) -> u8) -> Blocks {
    let spec = ModelSpec::preset("tiny").unwrap();
    let bytes = 2 * num_blocks * 16 * 256;
    let mut bufs: Vec<Vec<u8>> = (0..spec.num_layers as usize)
        .map(|l| (0..bytes).map(|i| fill(l, i)).collect())
        .collect();
    let regions: Vec<RawRegion> = bufs.iter_mut().map(|b| RawRegion::of(b)).collect();
    // SAFETY: the buffers live in the returned Blocks with the layout; loads and stores into
    // them finish before the test reads them.
    let layout = unsafe {
        KvLayout::vllm_flash_attn(
            &regions,
            num_blocks,
            16,
            spec.num_kv_heads,
            spec.head_dim,
            spec.dtype,
        )
    }
    .unwrap();
    Blocks { bufs, layout }
}

fn row<'a>(b: &'a Blocks, table: &[u32], layer: usize, plane: usize, pos: usize) -> &'a [u8] {
    let slot = table[pos / 16] as usize * 16 + pos % 16;
    let addr = b.layout.slot_addr(layer, plane, slot);
    let base = b.bufs[layer].as_ptr() as usize;
    &b.bufs[layer][addr - base..addr - base + 256]
}

#[test]
fn store_lookup_and_load_through_a_real_mount() {
    if !support::require::fuse() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let _mount = Mount::start(&cache, &mnt, &[]);

    let spec = ModelSpec::preset("tiny").unwrap();
    let loader = Loader::open(&mnt, spec.clone(), b"").unwrap();
    assert_eq!(loader.dir_layout(), Layout::Flat);
    let tokens: Vec<u32> = (0..600).map(|i| i * 31 % 32000).collect();
    assert_eq!(loader.lookup(&tokens), 0);

    // store two full chunks from the engine's blocks, through the mount
    let src = blocks(40, |l, i| (i.wrapping_mul(7) + l * 13) as u8);
    let src_table: Vec<u32> = (0..40).collect();
    let st = loader
        .store(
            &tokens,
            &Dest::host(&src.layout, BlockMap::Blocks(&src_table)),
        )
        .unwrap();
    assert_eq!((st.written, st.present), (2, 0));
    assert_eq!(loader.lookup(&tokens), 512);
    // the mount committed them to its disk tier (cache layout)
    for k in loader.chunk_keys(&tokens) {
        let on_disk = Layout::Cache.chunk_path(&cache, loader.namespace_dir(), &k.key);
        assert!(on_disk.exists(), "{} missing", on_disk.display());
    }
    // a second store finds them present
    let st = loader
        .store(
            &tokens,
            &Dest::host(&src.layout, BlockMap::Blocks(&src_table)),
        )
        .unwrap();
    assert_eq!((st.written, st.present), (0, 2));

    // load into other blocks, shuffled, fully verified; reads go to the backing files
    let dst = blocks(40, |_, _| 0);
    let dst_table: Vec<u32> = (0..40).rev().collect();
    let req = kvfs_loader::LoadRequest {
        tokens: &tokens,
        verify: Some(Verify::Full),
        ..Default::default()
    };
    let stats = loader
        .load_request(&req, &Dest::host(&dst.layout, BlockMap::Blocks(&dst_table)))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(stats.chunks, 2);
    assert_eq!(
        stats.backing_files, 2,
        "the loader should read the files named by user.kvfs.backing"
    );
    for layer in 0..2 {
        for plane in 0..2 {
            for pos in 0..512 {
                assert_eq!(
                    row(&dst, &dst_table, layer, plane, pos),
                    row(&src, &src_table, layer, plane, pos),
                    "layer {layer} plane {plane} position {pos}"
                );
            }
        }
    }

    // the same through the mount itself (no backing files)
    let through = Loader::open_with(
        &mnt,
        spec.clone(),
        b"",
        kvfs_loader::LoaderOptions {
            use_backing: false,
            ..Default::default()
        },
    )
    .unwrap();
    let dst2 = blocks(40, |_, _| 0);
    let stats = through
        .load(
            &tokens,
            &Dest::host(&dst2.layout, BlockMap::Blocks(&dst_table)),
        )
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(stats.backing_files, 0);
    assert_eq!(dst2.bufs, dst.bufs);

    // another tenant sees nothing
    let other = Loader::open(&mnt, spec, b"tenant-b").unwrap();
    assert_eq!(other.lookup(&tokens), 0);
}
