//! Commands on one chunk: `put`, `get`, `stat`, `rm`.
//!
//! `put` streams its input (the header is checked before the payload is read; memory stays
//! bounded, see [`crate::store::ChunkStream`]), verifies the whole chunk before anything
//! becomes visible and picks the namespace
//! directory from `--namespace`, from `--model` (creating the directory and its
//! `namespace.json`), or by the chunk's namespace id among existing directories. `get` reads
//! and checks the whole chunk, payload digest included, before it writes a byte, so a
//! consumer never receives a prefix of a bad chunk.

use super::{ChunkArg, CliError, Ctx, resolve_chunk};
use crate::store::{ChunkStream, StoreError};
use crate::units::human_bytes;
use clap::Args;
use kvfs_loader::dir::find_namespace_dir;
use kvfs_loader::format::Verify;
use kvfs_loader::spec::validate_namespace_dir;
use kvfs_loader::{ModelSpec, key::ChunkKey};
use std::io::{Read, Write};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct PutArgs {
    /// The .kvc chunk file; `-` or nothing reads it from stdin.
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Namespace directory to store into (`<slug>-<16 hex>`). Default: the existing
    /// directory whose suffix matches the chunk's namespace id.
    #[arg(long, value_name = "DIR")]
    pub namespace: Option<String>,
    /// Model preset the chunk belongs to: creates its namespace directory and namespace.json
    /// if needed. One of: llama-3-8b, llama-3-70b-tp8, qwen2.5-7b, smollm2-135m,
    /// deepseek-v2-lite, tiny.
    #[arg(long, value_name = "PRESET", conflicts_with = "namespace")]
    pub model: Option<String>,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Chunk key (64 hex digits, optionally `.kvc`), or `NS/KEY`.
    #[arg(value_name = "KEY")]
    pub key: String,
    /// Write to this file instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatArgs {
    /// Chunk key (64 hex digits, optionally `.kvc`), or `NS/KEY`.
    #[arg(value_name = "KEY")]
    pub key: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Share of groups per layer the importance summary lists (chunks with importance).
    #[arg(long, value_name = "SHARE", default_value_t = 0.2)]
    pub top: f64,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// Chunk key (64 hex digits, optionally `.kvc`), or `NS/KEY`.
    #[arg(value_name = "KEY")]
    pub key: String,
}

/// Looks up a preset by name, or explains which exist.
pub fn preset(name: &str) -> Result<ModelSpec, CliError> {
    ModelSpec::preset(name).ok_or_else(|| {
        CliError::Usage(format!(
            "unknown model preset `{name}` (known: {})",
            ModelSpec::PRESETS.join(", ")
        ))
    })
}

pub fn put(ctx: &Ctx, a: PutArgs) -> Result<i32, CliError> {
    // Argument errors first, before reading (possibly a lot of) input.
    if let Some(ns) = &a.namespace {
        validate_namespace_dir(ns).map_err(|e| CliError::Usage(e.to_string()))?;
    }
    let spec = a.model.as_deref().map(preset).transpose()?;
    // The header alone is read first: input that is not a chunk is refused before its
    // payload, and the payload is streamed to disk (bounded memory, whatever the size).
    let (input, origin): (Box<dyn Read>, Option<PathBuf>) = match a.file.as_deref() {
        None => (Box::new(std::io::stdin().lock()), None),
        Some(p) if p.as_os_str() == "-" => (Box::new(std::io::stdin().lock()), None),
        Some(p) => (
            Box::new(std::fs::File::open(p).map_err(|e| StoreError::Io {
                path: p.to_path_buf(),
                source: e,
            })?),
            Some(p.to_path_buf()),
        ),
    };
    let with_origin = |e: StoreError| match e {
        StoreError::Format { path: None, source } => StoreError::Format {
            path: origin.clone(),
            source,
        },
        e => e,
    };
    let stream = ChunkStream::open(input).map_err(with_origin)?;
    let header = stream.header().clone();
    let store = ctx.open_store()?;
    let ns_dir = if let Some(ns) = a.namespace {
        ns
    } else if let Some(spec) = spec {
        let ns = spec.namespace_dir();
        store.create_namespace(&ns, Some(&spec))?;
        ns
    } else {
        find_namespace_dir(store.root(), &header.meta.namespace)
            .map_err(|e| StoreError::Io {
                path: store.root().to_path_buf(),
                source: e,
            })?
            .ok_or_else(|| {
                CliError::Failed(format!(
                    "no namespace directory for namespace id {} under {}; pass --namespace DIR or --model PRESET",
                    &header.meta.namespace.to_hex()[..16],
                    store.root().display()
                ))
            })?
    };
    let out = store.put_stream(&ns_dir, stream).map_err(with_origin)?;
    outln!(
        "{} {}/{} ({})",
        if out.created {
            "stored"
        } else {
            "already present"
        },
        ns_dir,
        out.key,
        human_bytes(out.len)
    );
    Ok(0)
}

pub fn get(ctx: &Ctx, a: GetArgs) -> Result<i32, CliError> {
    let store = ctx.open_store()?;
    let ChunkArg { ns_dir, key } = resolve_chunk(&store, &a.key)?;
    let bytes = store.get_with(&ns_dir, &key, Verify::Full)?;
    match a.output {
        Some(p) => write_whole(&p, &bytes)?,
        None => {
            let mut out = std::io::stdout().lock();
            match out.write_all(&bytes).and_then(|()| out.flush()) {
                Ok(()) => {}
                // The reader took what it wanted (`kvfs get KEY | head -c 4096`).
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                Err(e) => {
                    return Err(StoreError::Io {
                        path: "<stdout>".into(),
                        source: e,
                    }
                    .into());
                }
            }
        }
    }
    Ok(0)
}

/// Writes `bytes` to `path`. A regular file (or a path that does not exist) is written through
/// a temporary file and a rename, so a failed write (a full disk) leaves no partial output
/// behind. An existing path that is not a regular file (`/dev/null`, a FIFO, `/dev/stdout`) is
/// opened and written in place: a rename would replace the device or pipe with a file (as
/// root, `-o /dev/null` replaced the machine's /dev/null). A symbolic link is followed, so its
/// target is what gets replaced, not the link.
fn write_whole(path: &std::path::Path, bytes: &[u8]) -> Result<(), CliError> {
    let io_err = |path: &std::path::Path, source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let target = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
        }
        _ => path.to_path_buf(),
    };
    if let Ok(m) = std::fs::metadata(&target)
        && !m.is_file()
    {
        return std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .and_then(|mut f| f.write_all(bytes))
            .map_err(|e| io_err(&target, e).into());
    }
    let name = target
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    let tmp = target.with_file_name(format!(".{name}.kvfs-tmp.{}", std::process::id()));
    let r = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &target));
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(&target, e).into());
    }
    Ok(())
}

fn hex(b: &[u8; 32]) -> String {
    ChunkKey(*b).to_hex()
}

pub fn stat(ctx: &Ctx, a: StatArgs) -> Result<i32, CliError> {
    let store = ctx.open_store()?;
    let ChunkArg { ns_dir, key } = resolve_chunk(&store, &a.key)?;
    let st = store.stat(&ns_dir, &key)?;
    let m = &st.header.meta;
    let g = &st.header.geometry;
    let parent = m.parent.map_or("none".to_string(), |p| p.to_hex());
    let kind = match m.origin {
        Some(p) => format!(
            "independent, original start position {p} (format v{})",
            m.version()
        ),
        None => format!("prefix (format v{})", m.version()),
    };
    let salt = if m.salt.is_none() {
        "none".to_string()
    } else {
        hex(&m.salt.0)
    };
    let mtime = st
        .mtime
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    let remote = super::remote::remote_presence(ctx, &ns_dir, &key);
    if !(a.top > 0.0 && a.top <= 1.0) {
        return Err(CliError::Usage(format!(
            "--top {} is not a share in (0, 1]",
            a.top
        )));
    }
    let importance = st
        .header
        .importance
        .as_ref()
        .map(|imp| super::importance::summarize(imp, a.top));
    if a.json {
        let v = serde_json::json!({
            "key": key.to_hex(),
            "namespace_dir": ns_dir,
            "namespace_id": m.namespace.to_hex(),
            "parent": m.parent.map(|p| p.to_hex()),
            "kind": if m.origin.is_some() { "independent" } else { "prefix" },
            "origin": m.origin,
            "version": m.version(),
            "salt_tag": (!m.salt.is_none()).then(|| hex(&m.salt.0)),
            "tokens": g.token_count,
            "dtype": m.dtype.to_string(),
            "kv_kind": m.kv_kind.name(),
            "layers": m.num_layers,
            "heads": m.num_heads,
            "head_dim": m.head_dim,
            "group_tokens": m.group_tokens,
            "header_len": st.header.header_len(),
            "size": st.len,
            "codec": st.header.codec.name(),
            "stored_bytes": st.len,
            "raw_bytes": g.file_len,
            "payload_digest": hex(&st.header.payload_digest),
            "tier": st.tier,
            "priority": st.priority,
            "path": st.path,
            "mtime": mtime,
            "remote": remote,
            "version": st.header.version,
            "importance": importance.as_ref().map(|i| i.json()),
        });
        outln!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(0);
    }
    outln!("key:            {}", key);
    outln!("namespace:      {} (id {})", ns_dir, m.namespace.to_hex());
    outln!("kind:           {kind}");
    outln!("parent:         {parent}");
    outln!("salt tag:       {salt}");
    outln!("tokens:         {}", g.token_count);
    outln!("dtype:          {}", m.dtype);
    outln!("kv kind:        {}", m.kv_kind.name());
    outln!(
        "shape:          {} layers x {} heads x {} head dim, groups of {} tokens",
        m.num_layers,
        m.num_heads,
        m.head_dim,
        m.group_tokens
    );
    outln!("header length:  {}", st.header.header_len());
    outln!("size:           {} ({} bytes)", human_bytes(st.len), st.len);
    outln!("codec:          {}", st.header.codec);
    outln!(
        "stored / raw:   {} / {} bytes ({:.2}x)",
        st.len,
        g.file_len,
        g.file_len as f64 / st.len.max(1) as f64
    );
    outln!("payload digest: {}", hex(&st.header.payload_digest));
    outln!("tier:           {}", st.tier);
    outln!("priority:       {}", st.priority);
    outln!("path:           {}", st.path.display());
    if let Some(t) = mtime {
        outln!("mtime:          {t} (unix seconds)");
    }
    if let Some(r) = remote {
        outln!("remote:         {r}");
    }
    outln!("format version: {}", st.header.version);
    match &importance {
        Some(i) => i.lines().iter().for_each(|l| outln!("{l}")),
        None => outln!("importance:     none"),
    }
    Ok(0)
}

pub fn rm(ctx: &Ctx, a: RmArgs) -> Result<i32, CliError> {
    let store = ctx.open_store()?;
    let ChunkArg { ns_dir, key } = resolve_chunk(&store, &a.key)?;
    if store.remove(&ns_dir, &key)? {
        outln!("removed {ns_dir}/{key}");
        Ok(0)
    } else {
        Err(StoreError::NotFound { ns_dir, key }.into())
    }
}
