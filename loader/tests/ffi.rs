//! The C ABI: the committed header matches what cbindgen generates from `src/ffi.rs`, and the
//! C example compiles against it and runs against the cdylib.
//!
//! Which library the C program links and runs against: the `libkvfs_loader.so` that cargo
//! built for this very test run (`support/c_program.rs`).

use std::path::Path;

#[path = "../../tests/support/require.rs"]
mod require;
mod support {
    pub mod c_program;
}

use support::c_program::{self, crate_dir, open_preset};

fn generate_header() -> String {
    let dir = crate_dir();
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).unwrap();
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/ffi.rs"))
        .generate()
        .expect("cbindgen failed on src/ffi.rs");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).unwrap()
}

/// Fails when `include/kvfs.h` is not what cbindgen makes of `src/ffi.rs`. Regenerate with
/// `KVFS_BLESS=1 cargo test -p kvfs-loader --test ffi`.
#[test]
fn header_is_up_to_date() {
    let path = crate_dir().join("include/kvfs.h");
    let fresh = generate_header();
    if std::env::var_os("KVFS_BLESS").is_some() {
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "loader/include/kvfs.h is out of date with src/ffi.rs; regenerate it with \
         `KVFS_BLESS=1 cargo test -p kvfs-loader --test ffi` and commit it"
    );
}

#[test]
fn c_example_runs_against_the_cdylib() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    if !require::cc(&cc) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let exe = work.path().join("kvfs_example");
    c_program::compile(&cc, &crate_dir().join("../examples/c/kvfs_example.c"), &exe);
    let cache = work.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let run = |dir: &Path| c_program::command(&exe).arg(dir).output().unwrap();
    let out = run(&cache);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "C example failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("stored 2 chunks"), "{stdout}");
    // a second run finds the chunks already there and still loads them
    let out = run(&cache);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("stored 0 chunks, hit 512 tokens"),
        "{stdout}"
    );
}

/// The spec-by-fields path of `kvfs_open`, and its refusals, called as C would.
#[test]
fn open_with_spec_fields_and_bad_arguments() {
    use kvfs_loader::ffi::*;
    use std::ffi::{CStr, CString};
    let d = tempfile::tempdir().unwrap();
    let dir = CString::new(d.path().to_str().unwrap()).unwrap();
    let model = CString::new("acme/model").unwrap();
    let dtype = CString::new("bf16").unwrap();
    let mut spec = KvfsSpec {
        model: model.as_ptr(),
        revision: std::ptr::null(),
        dtype: dtype.as_ptr(),
        num_layers: 4,
        num_kv_heads: 2,
        head_dim: 64,
        tp_size: 1,
        tp_rank: 0,
        rope_theta: 10000.0,
        rope_scaling: std::ptr::null(),
        chunk_tokens: 32,
        group_tokens: 16,
        kv_kind: 1,
        codec: std::ptr::null(),
    };
    let mut l: *mut KvfsLoader = std::ptr::null_mut();
    // SAFETY: every pointer is valid or NULL as the contract allows.
    let rc = unsafe {
        kvfs_open(
            dir.as_ptr(),
            std::ptr::null(),
            &spec,
            std::ptr::null(),
            0,
            &mut l,
        )
    };
    assert_eq!(rc, KVFS_OK);
    // SAFETY: `l` came from kvfs_open.
    assert_eq!(unsafe { kvfs_chunk_tokens(l) }, 32);
    let tokens: Vec<u32> = (0..100).collect();
    let mut hit = 99;
    // SAFETY: valid loader, tokens and out pointer.
    assert_eq!(
        unsafe { kvfs_lookup(l, tokens.as_ptr(), tokens.len(), &mut hit) },
        KVFS_OK
    );
    assert_eq!(hit, 0);
    // SAFETY: `l` came from kvfs_open and is not used afterwards.
    unsafe { kvfs_close(l) };

    let bad = CString::new("int4").unwrap();
    spec.dtype = bad.as_ptr();
    let mut l2: *mut KvfsLoader = std::ptr::null_mut();
    // SAFETY: as above.
    let rc = unsafe {
        kvfs_open(
            dir.as_ptr(),
            std::ptr::null(),
            &spec,
            std::ptr::null(),
            0,
            &mut l2,
        )
    };
    assert_eq!(rc, KVFS_ERR_INVALID);
    assert!(l2.is_null());
    // SAFETY: kvfs_last_error returns a NUL-terminated string valid until the next call.
    let msg = unsafe { CStr::from_ptr(kvfs_last_error()) }
        .to_str()
        .unwrap()
        .to_owned();
    assert!(msg.contains("int4"), "{msg}");
    // both preset and spec, and a NULL out pointer
    let preset = CString::new("tiny").unwrap();
    spec.dtype = dtype.as_ptr();
    // SAFETY: as above.
    let rc = unsafe {
        kvfs_open(
            dir.as_ptr(),
            preset.as_ptr(),
            &spec,
            std::ptr::null(),
            0,
            &mut l2,
        )
    };
    assert_eq!(rc, KVFS_ERR_INVALID);
    // SAFETY: a NULL out pointer is refused, not written.
    let rc = unsafe {
        kvfs_open(
            dir.as_ptr(),
            preset.as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            0,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, KVFS_ERR_INVALID);
    // a missing directory is an I/O error
    let missing = CString::new(d.path().join("missing").to_str().unwrap()).unwrap();
    // SAFETY: as above.
    let rc = unsafe {
        kvfs_open(
            missing.as_ptr(),
            preset.as_ptr(),
            std::ptr::null(),
            std::ptr::null(),
            0,
            &mut l2,
        )
    };
    assert_eq!(rc, KVFS_ERR_IO);
}

/// Missing and corrupt chunks through `kvfs_load`: the code says which, `*loaded` says how far
/// the valid prefix goes.
#[test]
fn load_errors_report_the_valid_prefix() {
    use kvfs_loader::dir::{Layout, commit_file};
    use kvfs_loader::ffi::*;
    let spec = kvfs_loader::ModelSpec::preset("tiny").unwrap();
    let d = tempfile::tempdir().unwrap();
    let tokens: Vec<u32> = (0..768).collect();
    let mut parent = None;
    let mut paths = Vec::new();
    for c in tokens.chunks(256) {
        let (meta, bytes) =
            kvfs_loader::synth_chunk(&spec, parent, kvfs_loader::SaltTag::NONE, c.to_vec())
                .unwrap();
        let p = Layout::Cache.chunk_path(d.path(), &spec.namespace_dir(), &meta.key);
        commit_file(&p, &bytes, false).unwrap();
        parent = Some(meta.key);
        paths.push(p);
    }
    let l = open_preset(d.path(), "tiny");
    // tiny: 2 layers, rows of 256 bytes; 48 blocks of 16 tokens
    let layer_bytes = 2 * 48 * 16 * 256;
    let mut mem: Vec<Vec<u8>> = vec![vec![0u8; layer_bytes]; 2];
    let ptrs: Vec<*mut std::ffi::c_void> = mem.iter_mut().map(|m| m.as_mut_ptr().cast()).collect();
    let table: Vec<u32> = (0..48).collect();
    let blocks = KvfsBlocks {
        layers: ptrs.as_ptr(),
        num_layers: 2,
        layer_bytes,
        num_blocks: 48,
        block_size: 16,
        block_table: table.as_ptr(),
        table_len: table.len(),
    };
    let load = |loaded: &mut usize| {
        // SAFETY: `l` is open; tokens, blocks and `loaded` are valid; `mem` outlives the call.
        unsafe { kvfs_load(l, tokens.as_ptr(), tokens.len(), 0, 768, &blocks, loaded) }
    };
    let mut loaded = 0;
    assert_eq!(load(&mut loaded), KVFS_OK);
    assert_eq!(loaded, 768);

    std::fs::remove_file(&paths[1]).unwrap();
    assert_eq!(load(&mut loaded), KVFS_ERR_MISSING);
    assert_eq!(loaded, 256);

    let mut bytes = std::fs::read(&paths[0]).unwrap();
    bytes[100] ^= 1; // header: checksum mismatch
    std::fs::remove_file(&paths[0]).unwrap();
    std::fs::write(&paths[0], &bytes).unwrap();
    assert_eq!(load(&mut loaded), KVFS_ERR_CORRUPT);
    assert_eq!(loaded, 0);
    // a block table too short for the range is a layout error
    let short = KvfsBlocks {
        table_len: 4,
        ..blocks
    };
    // SAFETY: as above.
    let rc = unsafe {
        kvfs_load(
            l,
            tokens.as_ptr(),
            tokens.len(),
            0,
            256,
            &short,
            &mut loaded,
        )
    };
    assert_eq!(rc, KVFS_ERR_LAYOUT);
    // SAFETY: `l` came from kvfs_open and is not used afterwards.
    unsafe { kvfs_close(l) };
}

/// A prompt's trailing partial chunk through the C ABI: `kvfs_store` keeps to full chunks,
/// `kvfs_store_with_tail` adds the tail, `kvfs_lookup` then reports every token, and
/// `kvfs_load` up to the last token fills the same bytes as the source.
#[test]
fn a_prompt_tail_round_trips_through_the_c_abi() {
    use kvfs_loader::ffi::*;
    let d = tempfile::tempdir().unwrap();
    // tiny: 2 layers, 256-token chunks, 256-byte rows
    let l = open_preset(d.path(), "tiny");
    // SAFETY: `l` is open.
    assert_eq!(unsafe { kvfs_chunk_tokens(l) }, 256);
    let tokens: Vec<u32> = (100..620).collect(); // 2 full chunks + 8 tokens
    let layer_bytes = 2 * 36 * 16 * 256;
    let mut src: Vec<Vec<u8>> = (0..2)
        .map(|l| (0..layer_bytes).map(|i| (i * 7 + l * 13) as u8).collect())
        .collect();
    let mut dst: Vec<Vec<u8>> = vec![vec![0u8; layer_bytes]; 2];
    let table: Vec<u32> = (0..33).rev().collect();
    let blocks = |mem: &mut Vec<Vec<u8>>, ptrs: &mut Vec<*mut std::ffi::c_void>| {
        *ptrs = mem.iter_mut().map(|m| m.as_mut_ptr().cast()).collect();
        KvfsBlocks {
            layers: ptrs.as_ptr(),
            num_layers: 2,
            layer_bytes,
            num_blocks: 36,
            block_size: 16,
            block_table: table.as_ptr(),
            table_len: table.len(),
        }
    };
    let (mut sp, mut dp) = (Vec::new(), Vec::new());
    let sb = blocks(&mut src, &mut sp);
    let db = blocks(&mut dst, &mut dp);
    let lookup = || {
        let mut hit = 0;
        // SAFETY: `l` is open; tokens and `hit` are valid.
        assert_eq!(
            unsafe { kvfs_lookup(l, tokens.as_ptr(), tokens.len(), &mut hit) },
            KVFS_OK
        );
        hit
    };
    let mut written = 0;
    // SAFETY: `l` is open; tokens, blocks and `written` are valid; `src` outlives the call.
    let rc = unsafe { kvfs_store(l, tokens.as_ptr(), tokens.len(), &sb, &mut written) };
    assert_eq!((rc, written), (KVFS_OK, 2));
    assert_eq!(lookup(), 512);
    // SAFETY: as above.
    let rc = unsafe { kvfs_store_with_tail(l, tokens.as_ptr(), tokens.len(), &sb, &mut written) };
    assert_eq!((rc, written), (KVFS_OK, 1));
    assert_eq!(lookup(), 520);
    let mut loaded = 0;
    // SAFETY: as above, with `dst` writable and outliving the call.
    let rc = unsafe { kvfs_load(l, tokens.as_ptr(), tokens.len(), 0, 519, &db, &mut loaded) };
    assert_eq!((rc, loaded), (KVFS_OK, 519));
    // flash-attn layout: [2 planes, blocks, 16 slots, 256-byte rows]; positions 0..519
    let plane = 36 * 16 * 256;
    for layer in 0..2 {
        for p in 0..2 {
            for pos in 0..520 {
                let at = p * plane + (table[pos / 16] as usize * 16 + pos % 16) * 256;
                let (got, want) = (&dst[layer][at..at + 256], &src[layer][at..at + 256]);
                if pos < 519 {
                    assert_eq!(got, want, "layer {layer} plane {p} position {pos}");
                } else {
                    assert!(
                        got.iter().all(|&b| b == 0),
                        "position 519 was not requested"
                    );
                }
            }
        }
    }
    // SAFETY: `l` came from kvfs_open and is not used afterwards.
    unsafe { kvfs_close(l) };
}
