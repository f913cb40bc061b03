//! The importance calls of the C ABI (issue 14): `kvfs_importance` and
//! `kvfs_importance_selection` from a real C program (loader/tests/c/importance.c, compiled
//! with `cc` against the header and the cdylib this test run built: support/c_program.rs)
//! give what the Rust API gives, from the headers alone; and their refusals, called as C
//! would: a chunk without importance, a missing chunk, a bad share, a short buffer.

use kvfs_loader::dir::{Layout, commit_file};
use kvfs_loader::ffi::*;
use kvfs_loader::format::{encode_chunk, encode_chunk_with, synth_fill};
use kvfs_loader::importance::Importance;
use kvfs_loader::{ChunkKey, ChunkMeta, Loader, ModelSpec, SaltTag};
use std::path::{Path, PathBuf};

#[path = "../../tests/support/require.rs"]
mod require;
mod support {
    pub mod c_program;
}

use support::c_program::{self, crate_dir, open_preset};

fn tiny() -> ModelSpec {
    ModelSpec::preset("tiny").unwrap()
}

/// Caches tokens `0..256 * chunks` (preset tiny: 2 layers, 16 groups a chunk), chunk `c`
/// with importance unless `c` is in `without`. Returns the paths and importances.
fn cache(root: &Path, chunks: usize, without: &[usize]) -> Vec<(PathBuf, Option<Importance>)> {
    let spec = tiny();
    let mut parent: Option<ChunkKey> = None;
    (0..chunks)
        .map(|c| {
            let tokens: Vec<u32> = (c as u32 * 256..(c as u32 + 1) * 256).collect();
            let meta = ChunkMeta::for_spec(&spec, parent, SaltTag::NONE, tokens);
            let fill = |l, p, d: &mut [u8]| synth_fill(&meta.key, l, p, d);
            let (bytes, imp) = if without.contains(&c) {
                (encode_chunk(&meta, fill).unwrap(), None)
            } else {
                // uneven, different per chunk and layer; each layer sums to 1 / chunks
                let raw: Vec<f32> = (0..2 * 16)
                    .map(|i| ((i * 7 + c * 5) % 16 + 1) as f32)
                    .collect();
                let scores = raw
                    .chunks(16)
                    .flat_map(|row| {
                        let sum: f32 = row.iter().sum();
                        row.iter().map(move |x| x / sum / chunks as f32)
                    })
                    .collect();
                let imp = Importance::new(2, 16, 32, scores).unwrap();
                (
                    encode_chunk_with(&meta, Some(&imp), fill).unwrap(),
                    Some(imp),
                )
            };
            let p = Layout::Cache.chunk_path(root, &spec.namespace_dir(), &meta.key);
            commit_file(&p, &bytes, false).unwrap();
            parent = Some(meta.key);
            (p, imp)
        })
        .collect()
}

#[test]
fn a_c_program_reads_importance_and_selections() {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    if !require::cc(&cc) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let exe = work.path().join("importance");
    c_program::compile(&cc, &crate_dir().join("tests/c/importance.c"), &exe);
    let root = work.path().join("cache");
    let chunks = cache(&root, 3, &[]);
    let n = 3 * 256;
    let out = c_program::command(&exe)
        .arg(&root)
        .arg(n.to_string())
        .arg("0.25")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "chunks 3 groups 16");
    // the scores, bit for bit, chunk by chunk, layer by layer
    let want: Vec<f32> = chunks
        .iter()
        .flat_map(|(_, imp)| {
            let imp = imp.as_ref().unwrap();
            (0..2).flat_map(move |l| imp.layer(l).to_vec())
        })
        .collect();
    let got: Vec<f32> = lines[1..=want.len()]
        .iter()
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(got, want);
    // the selection is the Rust API's: 25% of 48 groups = 12 per layer
    let loader = Loader::open(&root, tiny(), b"").unwrap();
    let tokens: Vec<u32> = (0..n as u32).collect();
    let sel = loader.importance_selection(&tokens, n, 0.25).unwrap();
    for layer in 0..2 {
        let groups: Vec<String> = sel.groups(layer).iter().map(u32::to_string).collect();
        assert_eq!(sel.groups(layer).len(), 12);
        assert_eq!(
            lines[1 + want.len() + layer],
            format!("layer {layer}: {}", groups.join(" "))
        );
    }
    assert_eq!(
        lines[3 + want.len()],
        format!("short buffer: {KVFS_ERR_INVALID}")
    );
}

#[test]
fn importance_refusals_are_typed_codes() {
    let d = tempfile::tempdir().unwrap();
    let chunks = cache(d.path(), 3, &[1]);
    let l = open_preset(d.path(), "tiny");
    let tokens: Vec<u32> = (0..768).collect();
    let (mut nc, mut g, mut k) = (0usize, 0usize, 0usize);
    let importance = |upto: usize, out: *mut f32, cap: usize, nc: &mut usize, g: &mut usize| {
        // SAFETY: `l` is open; tokens, out (NULL or `cap` floats) and counts are valid.
        unsafe { kvfs_importance(l, tokens.as_ptr(), tokens.len(), upto, out, cap, nc, g) }
    };
    let selection = |upto: usize, share: f64, k: &mut usize| {
        // SAFETY: as above, with a NULL output (a size query).
        unsafe {
            kvfs_importance_selection(
                l,
                tokens.as_ptr(),
                tokens.len(),
                upto,
                share,
                std::ptr::null_mut(),
                0,
                k,
            )
        }
    };
    // the first chunk has importance: fine
    assert_eq!(
        importance(256, std::ptr::null_mut(), 0, &mut nc, &mut g),
        KVFS_OK
    );
    assert_eq!((nc, g), (1, 16));
    let mut buf = vec![0f32; 32];
    assert_eq!(
        importance(256, buf.as_mut_ptr(), 31, &mut nc, &mut g),
        KVFS_ERR_INVALID
    );
    assert_eq!(
        importance(256, buf.as_mut_ptr(), 32, &mut nc, &mut g),
        KVFS_OK
    );
    assert_eq!(&buf[..16], chunks[0].1.as_ref().unwrap().layer(0));
    assert_eq!(selection(256, 0.5, &mut k), KVFS_OK);
    assert_eq!(k, 8);
    // chunk 1 was written without importance
    assert_eq!(
        importance(768, std::ptr::null_mut(), 0, &mut nc, &mut g),
        KVFS_ERR_NO_IMPORTANCE
    );
    assert_eq!(selection(512, 0.5, &mut k), KVFS_ERR_NO_IMPORTANCE);
    // shares outside (0, 1], a range past the full chunks
    for share in [0.0, 1.5, f64::NAN] {
        assert_eq!(selection(256, share, &mut k), KVFS_ERR_INVALID, "{share}");
    }
    assert_eq!(selection(1024, 0.5, &mut k), KVFS_ERR_INVALID);
    // a chunk gone is missing, a damaged header corrupt
    std::fs::remove_file(&chunks[2].0).unwrap();
    assert_eq!(
        importance(768, std::ptr::null_mut(), 0, &mut nc, &mut g),
        KVFS_ERR_MISSING
    );
    let mut bytes = std::fs::read(&chunks[0].0).unwrap();
    bytes[100] ^= 1;
    std::fs::remove_file(&chunks[0].0).unwrap();
    std::fs::write(&chunks[0].0, &bytes).unwrap();
    assert_eq!(selection(256, 0.5, &mut k), KVFS_ERR_CORRUPT);
    // NULL counts are refused
    // SAFETY: the NULL count pointers are the point; nothing is written through them.
    let rc = unsafe {
        kvfs_importance(
            l,
            tokens.as_ptr(),
            256,
            256,
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, KVFS_ERR_INVALID);
    // SAFETY: `l` came from kvfs_open and is not used afterwards.
    unsafe { kvfs_close(l) };
}
