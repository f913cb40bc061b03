//! `kvfs demo`, the README's main job: it must work on an empty cache and again on a warm one.

use std::process::Command;

fn demo(cache: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kvfs"))
        .arg("--cache-dir")
        .arg(cache)
        .arg("demo")
        .args(args)
        .output()
        .expect("run kvfs demo");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn demo_stores_then_reuses_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = demo(
        dir.path(),
        &["--model", "tiny", "--tokens", "600", "--block-size", "16"],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("stored 2 new chunks (0 already cached)"),
        "{out}"
    );
    assert!(out.contains("512 of 700 prompt tokens cached"), "{out}");
    assert!(out.contains("every loaded KV row matches"), "{out}");

    // A second engine with another block size reuses what the first stored.
    let (ok, out) = demo(
        dir.path(),
        &["--model", "tiny", "--tokens", "600", "--block-size", "48"],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("stored 0 new chunks (2 already cached)"),
        "{out}"
    );
    assert!(out.contains("every loaded KV row matches"), "{out}");
}

#[test]
fn demo_rejects_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = demo(dir.path(), &["--model", "no-such-model"]);
    assert!(!ok);
    assert!(out.contains("unknown model"), "{out}");
    let (ok, out) = demo(dir.path(), &["--model", "tiny", "--tokens", "10"]);
    assert!(!ok);
    assert!(out.contains("at least one chunk"), "{out}");
}
