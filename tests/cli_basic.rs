//! The real `kvfs` binary: synth, ls, stat, get, put, rm, gc, info, verify, help, config
//! precedence and exit codes.

use kvfs_loader::{ModelSpec, SaltTag, chunk_keys};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

struct Run {
    out: Output,
}

impl Run {
    fn code(&self) -> i32 {
        self.out.status.code().unwrap_or(-1)
    }
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    #[track_caller]
    fn ok(self) -> Run {
        assert_eq!(
            self.code(),
            0,
            "stdout: {}\nstderr: {}",
            self.stdout(),
            self.stderr()
        );
        self
    }
}

/// A `kvfs` command with a clean environment (no user config) and the given cache dir.
fn kvfs(cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvfs"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", cache.join("home"))
        .arg("--cache-dir")
        .arg(cache)
        .arg("--fsync")
        .arg("never");
    c
}

fn run(mut c: Command) -> Run {
    Run {
        out: c.stdin(Stdio::null()).output().unwrap(),
    }
}

fn run_with_stdin(mut c: Command, input: &[u8]) -> Run {
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    Run {
        out: child.wait_with_output().unwrap(),
    }
}

fn tiny() -> ModelSpec {
    ModelSpec::preset("tiny").unwrap()
}

fn synth(cache: &Path, tokens: usize, extra: &[&str]) -> Run {
    let mut c = kvfs(cache);
    c.args(["synth", "--model", "tiny", "--tokens", &tokens.to_string()])
        .args(extra);
    run(c).ok()
}

fn chunk_file(cache: &Path, ns: &str, key: &str) -> PathBuf {
    cache.join(ns).join(&key[..2]).join(format!("{key}.kvc"))
}

#[test]
fn help_everywhere_and_usage_errors_exit_2() {
    let d = tempfile::tempdir().unwrap();
    let r = run({
        let mut c = kvfs(d.path());
        c.arg("--help");
        c
    })
    .ok();
    for cmd in [
        "put", "get", "ls", "stat", "verify", "rm", "gc", "info", "synth",
    ] {
        assert!(r.stdout().contains(cmd), "--help lists {cmd}");
        let mut c = kvfs(d.path());
        c.args([cmd, "--help"]);
        let h = run(c).ok();
        assert!(h.stdout().contains("Usage: kvfs"), "{cmd} --help");
    }
    let mut c = kvfs(d.path());
    c.arg("frobnicate");
    assert_eq!(run(c).code(), 2);
    let c = Command::new(env!("CARGO_BIN_EXE_kvfs"));
    assert_eq!(run(c).code(), 2, "no command");
    let mut c = kvfs(d.path());
    c.args(["synth", "--model", "nonesuch", "--tokens", "512"]);
    let r = run(c);
    assert_eq!(r.code(), 2);
    assert!(r.stderr().starts_with("kvfs: error: unknown model preset"));
    assert!(r.stderr().contains("llama-3-8b"), "lists the presets");
}

#[test]
fn synth_ls_stat_get_rm() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path();
    let spec = tiny();
    let ns = spec.namespace_dir();
    let r = synth(cache, 1000, &["--seed", "7"]);
    let out = r.stdout();
    assert!(out.contains(&format!("namespace: {}", cache.join(&ns).display())));
    assert!(out.contains("chunks: 3 (3 new)"), "{out}");
    assert!(out.contains("prompt_tokens(seed=7, n=1000)"), "{out}");
    assert!(out.contains("the last 232 tokens"), "{out}");
    // The keys are reproducible from the printed recipe.
    let tokens = kvfs::synth::prompt_tokens(7, 1000);
    let refs = chunk_keys(&spec.namespace_id(), &SaltTag::NONE, 256, &tokens);
    assert_eq!(refs.len(), 3);
    for r in &refs {
        assert!(chunk_file(cache, &ns, &r.key.to_hex()).is_file());
    }
    assert_eq!(
        fs::read_to_string(cache.join(&ns).join("namespace.json")).unwrap(),
        spec.to_json()
    );
    // Idempotent.
    assert!(
        synth(cache, 1000, &["--seed", "7"])
            .stdout()
            .contains("chunks: 3 (0 new)")
    );

    let mut c = kvfs(cache);
    c.arg("ls");
    let ls = run(c).ok().stdout();
    assert!(ls.starts_with(&format!("{ns}\t3 chunks\t")), "{ls}");
    let mut c = kvfs(cache);
    c.args(["ls", &ns]);
    let ls = run(c).ok().stdout();
    let mut want: Vec<String> = refs.iter().map(|r| r.key.to_hex()).collect();
    want.sort();
    let got: Vec<String> = ls
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect();
    assert_eq!(got, want);

    let key = refs[1].key.to_hex();
    let mut c = kvfs(cache);
    c.args(["stat", &key]);
    let st = run(c).ok().stdout();
    assert!(
        st.contains(&format!("parent:         {}", refs[0].key.to_hex())),
        "{st}"
    );
    assert!(st.contains("tokens:         256"));
    assert!(st.contains("tier:           disk"));
    assert!(st.contains(&chunk_file(cache, &ns, &key).display().to_string()));
    let mut c = kvfs(cache);
    c.args(["stat", "--json", &format!("{ns}/{key}.kvc")]);
    let j: serde_json::Value = serde_json::from_str(&run(c).ok().stdout()).unwrap();
    assert_eq!(j["key"], key.as_str());
    assert_eq!(j["namespace_dir"], ns.as_str());
    assert_eq!(j["layers"], 2);

    let file_bytes = fs::read(chunk_file(cache, &ns, &key)).unwrap();
    let mut c = kvfs(cache);
    c.args(["get", &key]);
    assert_eq!(run(c).ok().out.stdout, file_bytes);
    let dst = cache.join("out.kvc");
    let mut c = kvfs(cache);
    c.args(["get", &format!("{ns}/{key}"), "-o"]).arg(&dst);
    run(c).ok();
    assert_eq!(fs::read(&dst).unwrap(), file_bytes);
    get_into_a_fifo_and_through_a_symlink(cache, &format!("{ns}/{key}"), &file_bytes);

    let mut c = kvfs(cache);
    c.args(["rm", &key]);
    assert!(run(c).ok().stdout().contains("removed"));
    assert!(!chunk_file(cache, &ns, &key).exists());
    let mut c = kvfs(cache);
    c.args(["rm", &key]);
    let r = run(c);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr().starts_with("kvfs: error: chunk"),
        "{}",
        r.stderr()
    );
    assert_eq!(r.stderr().lines().count(), 1, "one line");
    let mut c = kvfs(cache);
    c.args(["get", &key]);
    let r = run(c);
    assert_eq!(r.code(), 1);
    assert!(r.out.stdout.is_empty());
}

/// `get -o` into what is not a regular file writes into it and leaves it what it was: a FIFO
/// stays a FIFO (the reader gets the chunk; a rename would have replaced it with a file, as it
/// once replaced /dev/null), and a symbolic link stays a link whose target gets the chunk.
fn get_into_a_fifo_and_through_a_symlink(cache: &Path, name: &str, want: &[u8]) {
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    let fifo = cache.join("out.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo");
    // The reader blocks in open until a writer comes; a channel with a timeout, so a
    // regression (no writer ever opens the FIFO) fails instead of hanging.
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut got = Vec::new();
            fs::File::open(&fifo)
                .unwrap()
                .read_to_end(&mut got)
                .unwrap();
            let _ = tx.send(got);
        });
    }
    let mut c = kvfs(cache);
    c.args(["get", name, "-o"]).arg(&fifo);
    run(c).ok();
    assert!(
        fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(),
        "the FIFO was replaced"
    );
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the FIFO's reader got nothing");
    assert_eq!(got, want);

    let target = cache.join("target.kvc");
    fs::write(&target, b"old").unwrap();
    let link = cache.join("link.kvc");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let mut c = kvfs(cache);
    c.args(["get", name, "-o"]).arg(&link);
    run(c).ok();
    assert!(
        fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::read(&target).unwrap(), want);
}

#[test]
fn salt_changes_every_key() {
    let d = tempfile::tempdir().unwrap();
    let r = synth(d.path(), 512, &["--salt", "tenant-a"]).stdout();
    let spec = tiny();
    let tokens = kvfs::synth::prompt_tokens(0, 512);
    let salted = chunk_keys(
        &spec.namespace_id(),
        &SaltTag::of(b"tenant-a"),
        256,
        &tokens,
    );
    let plain = chunk_keys(&spec.namespace_id(), &SaltTag::NONE, 256, &tokens);
    assert!(r.contains(&format!("last key: {}", salted[1].key)), "{r}");
    assert!(!r.contains(&plain[0].key.to_hex()));
}

#[test]
fn put_finds_or_creates_the_namespace() {
    let src = tempfile::tempdir().unwrap();
    let spec = tiny();
    let ns = spec.namespace_dir();
    synth(src.path(), 512, &[]);
    let tokens = kvfs::synth::prompt_tokens(0, 512);
    let refs = chunk_keys(&spec.namespace_id(), &SaltTag::NONE, 256, &tokens);
    let f0 = chunk_file(src.path(), &ns, &refs[0].key.to_hex());
    let f1 = chunk_file(src.path(), &ns, &refs[1].key.to_hex());

    let dst = tempfile::tempdir().unwrap();
    // No namespace directory yet: a clear error naming the options.
    let mut c = kvfs(dst.path());
    c.arg("put").arg(&f0);
    let r = run(c);
    assert_eq!(r.code(), 1);
    assert!(r.stderr().contains("--namespace") && r.stderr().contains("--model"));
    // --model creates it (with namespace.json).
    let mut c = kvfs(dst.path());
    c.args(["put", "--model", "tiny"]).arg(&f0);
    assert!(run(c).ok().stdout().starts_with("stored "));
    assert!(dst.path().join(&ns).join("namespace.json").is_file());
    // Now found by the namespace id, from stdin.
    let mut c = kvfs(dst.path());
    c.arg("put");
    let r = run_with_stdin(c, &fs::read(&f1).unwrap()).ok();
    assert!(r.stdout().contains(&refs[1].key.to_hex()));
    let mut c = kvfs(dst.path());
    c.args(["put", "-"]);
    assert!(
        run_with_stdin(c, &fs::read(&f1).unwrap())
            .ok()
            .stdout()
            .starts_with("already present")
    );
    assert_eq!(
        fs::read(chunk_file(dst.path(), &ns, &refs[1].key.to_hex())).unwrap(),
        fs::read(&f1).unwrap()
    );
    // --namespace with a directory of another model is refused.
    let other = ModelSpec::preset("llama-3-8b").unwrap().namespace_dir();
    let mut c = kvfs(dst.path());
    c.args(["put", "--namespace", &other]).arg(&f0);
    let r = run(c);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr()
            .contains("cannot be stored in namespace directory")
    );
}

#[test]
fn verify_gc_info() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path();
    synth(cache, 256 * 4, &[]);
    let mut c = kvfs(cache);
    c.arg("verify");
    let r = run(c).ok();
    assert!(
        r.stdout().contains("verified 4 files: 4 ok"),
        "{}",
        r.stdout()
    );

    let chunk_len = 4096 + 4 * 65536u64;
    let mut c = kvfs(cache);
    c.args(["gc", "--capacity", &(2 * chunk_len).to_string()]);
    assert!(run(c).ok().stdout().starts_with("evicted 2 chunks"));

    let mut c = kvfs(cache);
    c.args(["info", "--json"]);
    let j: serde_json::Value = serde_json::from_str(&run(c).ok().stdout()).unwrap();
    assert_eq!(j["namespaces"][0]["chunks"], 2);
    assert_eq!(j["capacity"]["used_bytes"], 2 * chunk_len);
    assert!(j["capacity"]["fs_free_bytes"].as_u64().unwrap() > 0);
    let mut c = kvfs(cache);
    c.arg("info");
    let text = run(c).ok().stdout();
    assert!(
        text.contains("namespaces: 1") && text.contains("free space:"),
        "{text}"
    );
}

#[test]
fn flags_override_env_override_config_file() {
    let d = tempfile::tempdir().unwrap();
    let (from_file, from_env, from_flag) = (
        d.path().join("file"),
        d.path().join("env"),
        d.path().join("flag"),
    );
    let conf = d.path().join("kvfs.toml");
    fs::write(
        &conf,
        format!(
            "cache_dir = \"{}\"\ncapacity = \"1GiB\"\n",
            from_file.display()
        ),
    )
    .unwrap();
    let info = |env_dir: Option<&Path>, flag_dir: Option<&Path>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kvfs"));
        c.env_clear()
            .env("HOME", d.path())
            .env("KVFS_CONFIG", &conf);
        if let Some(e) = env_dir {
            c.env("KVFS_CACHE_DIR", e);
        }
        if let Some(f) = flag_dir {
            c.arg("--cache-dir").arg(f);
        }
        c.args(["info", "--json"]);
        let j: serde_json::Value = serde_json::from_str(&run(c).ok().stdout()).unwrap();
        (
            PathBuf::from(j["cache_dir"].as_str().unwrap()),
            j["config"]["capacity"].as_str().unwrap().to_string(),
        )
    };
    assert_eq!(info(None, None), (from_file.clone(), "1GiB".into()));
    assert_eq!(info(Some(&from_env), None).0, from_env);
    assert_eq!(info(Some(&from_env), Some(&from_flag)).0, from_flag);

    // The default cache directory is per user.
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvfs"));
    c.env_clear().env("HOME", d.path()).args(["info", "--json"]);
    let j: serde_json::Value = serde_json::from_str(&run(c).ok().stdout()).unwrap();
    assert_eq!(
        j["cache_dir"].as_str().unwrap(),
        d.path().join(".cache/kvfs").to_str().unwrap()
    );

    // A typo in the config file fails, naming the key.
    fs::write(&conf, "capacty = \"1GiB\"\n").unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvfs"));
    c.env_clear()
        .env("HOME", d.path())
        .env("KVFS_CONFIG", &conf)
        .arg("info");
    let r = run(c);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr().starts_with("kvfs: error: config file"),
        "{}",
        r.stderr()
    );
    assert!(r.stderr().contains("capacty"));
    // A bad environment value names the variable.
    let mut c = kvfs(d.path());
    c.env("KVFS_MEMORY", "lots").arg("info");
    let r = run(c);
    assert_eq!(r.code(), 1);
    assert!(r.stderr().contains("KVFS_MEMORY"), "{}", r.stderr());
    // A bad flag value is a usage error.
    let mut c = kvfs(d.path());
    c.args(["--capacity", "12 parsecs", "info"]);
    assert_eq!(run(c).code(), 2);
}

#[test]
fn synth_with_a_codec_and_stat_info_show_it() {
    for codec in [kvfs_loader::Codec::Kivi4, kvfs_loader::Codec::Int8] {
        synth_with_codec_and_stat_info_show_it(codec);
    }
}

fn synth_with_codec_and_stat_info_show_it(codec: kvfs_loader::Codec) {
    let name = codec.name();
    let d = tempfile::tempdir().unwrap();
    let cache = d.path();
    // A lossy codec is its own namespace: other keys, other directory.
    let mut spec = tiny();
    spec.codec = codec;
    let ns = spec.namespace_dir();
    assert_ne!(ns, tiny().namespace_dir());
    let out = synth(cache, 512, &["--codec", name]).stdout();
    assert!(
        out.contains(&format!("namespace: {}", cache.join(&ns).display())),
        "{out}"
    );
    assert!(out.contains(&format!("codec: {name}")), "{out}");
    let tokens = kvfs::synth::prompt_tokens(0, 512);
    let refs = chunk_keys(&spec.namespace_id(), &SaltTag::NONE, 256, &tokens);
    let key = refs[1].key.to_hex();
    let raw_len = kvfs_loader::ChunkMeta::for_spec(&tiny(), None, SaltTag::NONE, vec![0; 256])
        .geometry()
        .unwrap()
        .file_len;
    let stored = fs::metadata(chunk_file(cache, &ns, &key)).unwrap().len();
    assert!(stored < raw_len, "{stored} >= {raw_len}");
    let mut c = kvfs(cache);
    c.args(["stat", "--json", &key]);
    let j: serde_json::Value = serde_json::from_str(&run(c).ok().stdout()).unwrap();
    assert_eq!(j["codec"], name);
    assert_eq!(j["stored_bytes"], stored);
    assert_eq!(j["raw_bytes"], raw_len);
    let mut c = kvfs(cache);
    c.args(["stat", &key]);
    let st = run(c).ok().stdout();
    assert!(st.contains(&format!("codec:          {name}")), "{st}");
    let mut c = kvfs(cache);
    c.arg("info");
    let info = run(c).ok().stdout();
    let ratio = format!("{:.2}x", raw_len as f64 / stored as f64);
    assert!(info.contains(&ratio), "{info} lacks {ratio}");
    // Verification reads coded chunks as they are.
    let mut c = kvfs(cache);
    c.arg("verify");
    run(c).ok();
    // A codec this build does not know is a usage error naming it.
    let mut c = kvfs(cache);
    c.args([
        "synth", "--model", "tiny", "--tokens", "256", "--codec", "zip9",
    ]);
    let r = run(c);
    assert_eq!(r.code(), 2);
    assert!(r.stderr().contains("zip9"), "{}", r.stderr());
    // ... and lists the codecs it knows.
    assert!(r.stderr().contains("int8"), "{}", r.stderr());
}

/// `kvfs stat` tells a position-independent (format v2) chunk from a prefix chunk and shows
/// its original start position.
#[test]
fn stat_shows_the_chunk_kind() {
    let d = tempfile::tempdir().unwrap();
    let spec = tiny();
    let meta = kvfs_loader::ChunkMeta::independent(&spec, SaltTag::NONE, (5..45).collect(), 300);
    let bytes = kvfs_loader::encode_chunk(&meta, |l, p, dst| {
        kvfs_loader::format::synth_fill(&meta.key, l, p, dst)
    })
    .unwrap();
    let mut c = kvfs(d.path());
    c.args(["put", "--model", "tiny", "-"]);
    run_with_stdin(c, &bytes).ok();
    let key = meta.key.to_hex();
    let mut c = kvfs(d.path());
    c.args(["stat", &key]);
    let st = run(c).ok().stdout();
    assert!(
        st.contains("kind:           independent, original start position 300 (format v2)"),
        "{st}"
    );
    assert!(st.contains("parent:         none"), "{st}");
    let mut c = kvfs(d.path());
    c.args(["stat", "--json", &key]);
    let j: serde_json::Value = serde_json::from_str(&run(c).ok().stdout()).unwrap();
    assert_eq!(j["kind"], "independent");
    assert_eq!(j["origin"], 300);
    assert_eq!(j["version"], 2);
    // A prefix chunk says so.
    synth(d.path(), 256, &[]);
    let tokens = kvfs::synth::prompt_tokens(0, 256);
    let refs = chunk_keys(&spec.namespace_id(), &SaltTag::NONE, 256, &tokens);
    let mut c = kvfs(d.path());
    c.args(["stat", &refs[0].key.to_hex()]);
    let st = run(c).ok().stdout();
    assert!(st.contains("kind:           prefix (format v1)"), "{st}");
}
