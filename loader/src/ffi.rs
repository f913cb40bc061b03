//! The C ABI: open, lookup, load, store and close, for engines that are not written in Rust.
//!
//! The header `loader/include/kvfs.h` is generated from this file by cbindgen (configured by
//! `loader/cbindgen.toml`) and committed; `loader/tests/ffi.rs` regenerates it and fails if it
//! differs, so it cannot drift. Conventions:
//!
//! - every function returns an `int`: [`KVFS_OK`] (0) or a negative `KVFS_ERR_*` code; the
//!   message of the last error on the calling thread is [`kvfs_last_error`];
//! - a loader is an opaque `kvfs_loader *`, freed by [`kvfs_close`]; it may be used from several
//!   threads at once;
//! - KV memory is given as vLLM flash-attn tensors, one per layer
//!   (`[2, num_blocks, block_size, num_kv_heads, head_size]`), by base pointer and byte length,
//!   with a block table. `kvfs_load` is synchronous; `kvfs_load_start`,
//!   `kvfs_load_wait_layer` and `kvfs_load_finish` are the layer-wise form;
//! - importance (ContiguousKV, issue 14) is read from chunk headers alone:
//!   `kvfs_importance` copies the scores of a prefix's chunks, `kvfs_importance_selection`
//!   ranks them into the groups a pruned load keeps, as `Loader::importance_selection` does;
//!   both take a NULL output to report the size it needs;
//! - no Rust panic crosses the boundary: one becomes [`KVFS_ERR_PANIC`].

use crate::error::FormatError;
use crate::layout::{BlockMap, KvLayout, RawRegion};
use crate::loader::{ChunkError, Dest, LoadHandle, LoadRequest, Loader, LoaderError};
use crate::prefetch::PrefetchError;
use crate::spec::{Dtype, KvKind, ModelSpec};
use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

/// Success.
pub const KVFS_OK: c_int = 0;
/// A bad argument: null pointer, unknown preset or dtype, inconsistent sizes.
pub const KVFS_ERR_INVALID: c_int = -1;
/// An I/O error (directory missing, write failed).
pub const KVFS_ERR_IO: c_int = -2;
/// A chunk is corrupt or does not match the spec; the valid prefix is reported.
pub const KVFS_ERR_CORRUPT: c_int = -3;
/// A chunk of the requested range is missing; the valid prefix is reported.
pub const KVFS_ERR_MISSING: c_int = -4;
/// The KV memory does not fit the model or the block table.
pub const KVFS_ERR_LAYOUT: c_int = -5;
/// A bug: the library panicked.
pub const KVFS_ERR_PANIC: c_int = -6;
/// A chunk carries no importance (written without it, or format version 1).
pub const KVFS_ERR_NO_IMPORTANCE: c_int = -7;

/// A model spec, field by field (see `ModelSpec`). Strings are NUL-terminated UTF-8;
/// `revision` and `rope_scaling` may be NULL (empty). `dtype` is one of "f16", "bf16", "f32",
/// "fp8_e4m3", "fp8_e5m2"; `kv_kind` is 1 (K and V) or 2 (MLA latent). `codec` is how chunks
/// are stored: NULL or "raw", "lossless", "fp8", "int8", "kivi4", "kivi2"
/// (a lossy codec is its own namespace; loads decode any codec).
#[repr(C)]
pub struct KvfsSpec {
    pub model: *const c_char,
    pub revision: *const c_char,
    pub dtype: *const c_char,
    pub num_layers: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub tp_size: u32,
    pub tp_rank: u32,
    pub rope_theta: f64,
    pub rope_scaling: *const c_char,
    pub chunk_tokens: u32,
    pub group_tokens: u32,
    pub kv_kind: u32,
    pub codec: *const c_char,
}

/// An open loader (opaque to C).
pub struct KvfsLoader {
    loader: Loader,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

struct Fail(c_int, String);

fn invalid(msg: impl Into<String>) -> Fail {
    Fail(KVFS_ERR_INVALID, msg.into())
}

fn code_of(e: &LoaderError) -> c_int {
    match e {
        LoaderError::Spec(_) | LoaderError::Invalid(_) => KVFS_ERR_INVALID,
        LoaderError::Io { .. } | LoaderError::Store { .. } => KVFS_ERR_IO,
        LoaderError::Layout(_) => KVFS_ERR_LAYOUT,
        LoaderError::Chunk { source, .. } => match **source {
            ChunkError::Missing => KVFS_ERR_MISSING,
            ChunkError::Io(_) => KVFS_ERR_IO,
            ChunkError::Format(_) | ChunkError::Mismatch(_) => KVFS_ERR_CORRUPT,
        },
    }
}

impl From<LoaderError> for Fail {
    fn from(e: LoaderError) -> Self {
        Fail(code_of(&e), e.to_string())
    }
}

/// Runs `f`, turning errors and panics into codes and the thread's last error.
fn guard(f: impl FnOnce() -> Result<(), Fail>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => KVFS_OK,
        Ok(Err(Fail(code, msg))) => {
            set_error(msg);
            code
        }
        Err(_) => {
            set_error("kvfs-loader panicked (a bug; please report)".into());
            KVFS_ERR_PANIC
        }
    }
}

/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn opt_str<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, Fail> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null and NUL-terminated per the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map(Some)
        .map_err(|_| invalid(format!("{what} is not UTF-8")))
}

/// # Safety
/// `p` is NULL or points to `n` readable elements.
unsafe fn slice<'a, T>(p: *const T, n: usize, what: &str) -> Result<&'a [T], Fail> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-null and valid for `n` elements per the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// # Safety
/// `spec` points to a valid `KvfsSpec` whose strings are NULL or NUL-terminated.
unsafe fn spec_from_c(spec: &KvfsSpec) -> Result<ModelSpec, Fail> {
    // SAFETY (all three): forwarded from this function's contract.
    let model = unsafe { opt_str(spec.model, "model") }?.ok_or_else(|| invalid("model is NULL"))?;
    let dtype_s =
        unsafe { opt_str(spec.dtype, "dtype") }?.ok_or_else(|| invalid("dtype is NULL"))?;
    let dtype =
        Dtype::parse(dtype_s).ok_or_else(|| invalid(format!("unknown dtype {dtype_s:?}")))?;
    let kv_kind = KvKind::from_u8(spec.kv_kind.try_into().unwrap_or(0))
        .ok_or_else(|| invalid(format!("unknown kv_kind {}", spec.kv_kind)))?;
    let mut s = ModelSpec::new(
        model,
        dtype,
        spec.num_layers,
        spec.num_kv_heads,
        spec.head_dim,
    );
    // SAFETY: forwarded from this function's contract.
    s.revision = unsafe { opt_str(spec.revision, "revision") }?
        .unwrap_or("")
        .into();
    // SAFETY: forwarded from this function's contract.
    s.rope_scaling = unsafe { opt_str(spec.rope_scaling, "rope_scaling") }?
        .unwrap_or("")
        .into();
    s.tp_size = spec.tp_size;
    s.tp_rank = spec.tp_rank;
    s.rope_theta = spec.rope_theta;
    s.chunk_tokens = spec.chunk_tokens;
    s.group_tokens = spec.group_tokens;
    s.kv_kind = kv_kind;
    // SAFETY: forwarded from this function's contract.
    if let Some(c) = unsafe { opt_str(spec.codec, "codec") }? {
        s.codec = crate::codec::Codec::parse(c).map_err(|e| invalid(e.to_string()))?;
    }
    Ok(s)
}

/// The message of the last error on this thread ("" if none). Valid until the next kvfs call
/// on this thread.
#[unsafe(no_mangle)]
pub extern "C" fn kvfs_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Opens a loader on the chunk directory `dir` (a kvfs mount or a cache directory) for the
/// model named by `preset` (e.g. "llama-3-8b") or described by `spec` (give exactly one; the
/// other NULL). `salt` (`salt_len` bytes, may be NULL) isolates a tenant. On success `*out`
/// holds the loader.
///
/// # Safety
/// `dir` and `preset` are NULL or NUL-terminated; `spec` is NULL or valid; `salt` is NULL or
/// readable for `salt_len` bytes; `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvfs_open(
    dir: *const c_char,
    preset: *const c_char,
    spec: *const KvfsSpec,
    salt: *const u8,
    salt_len: usize,
    out: *mut *mut KvfsLoader,
) -> c_int {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        // SAFETY: forwarded from this function's contract.
        let dir = unsafe { opt_str(dir, "dir") }?.ok_or_else(|| invalid("dir is NULL"))?;
        // SAFETY: forwarded from this function's contract.
        let preset = unsafe { opt_str(preset, "preset") }?;
        let spec = match (preset, spec.is_null()) {
            (Some(p), true) => {
                ModelSpec::preset(p).ok_or_else(|| invalid(format!("unknown preset {p:?}")))?
            }
            // SAFETY: non-null, valid per the contract.
            (None, false) => unsafe { spec_from_c(&*spec) }?,
            _ => return Err(invalid("give exactly one of preset and spec")),
        };
        // SAFETY: forwarded from this function's contract.
        let salt = unsafe { slice(salt, salt_len, "salt") }?;
        let loader = Loader::open(Path::new(dir), spec, salt)?;
        let boxed = Box::into_raw(Box::new(KvfsLoader { loader }));
        // SAFETY: `out` is non-null and writable per the contract.
        unsafe { *out = boxed };
        Ok(())
    })
}

/// Frees a loader (NULL is ignored).
///
/// # Safety
/// `loader` is NULL or came from `kvfs_open` and is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvfs_close(loader: *mut KvfsLoader) {
    if !loader.is_null() {
        // SAFETY: created by Box::into_raw in kvfs_open and freed only here.
        drop(unsafe { Box::from_raw(loader) });
    }
}

/// How many leading tokens of `tokens[0..num_tokens]` are cached -> `*hit`: full chunks, and
/// all `num_tokens` when the trailing partial chunk was stored too (`kvfs_store_with_tail`).
///
/// # Safety
/// `loader` came from `kvfs_open`; `tokens` is readable for `num_tokens` values; `hit` is
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvfs_lookup(
    loader: *const KvfsLoader,
    tokens: *const u32,
    num_tokens: usize,
    hit: *mut usize,
) -> c_int {
    guard(|| {
        if loader.is_null() || hit.is_null() {
            return Err(invalid("loader or hit is NULL"));
        }
        // SAFETY: forwarded from this function's contract.
        let tokens = unsafe { slice(tokens, num_tokens, "tokens") }?;
        // SAFETY: valid loader and writable `hit` per the contract.
        unsafe { *hit = (*loader).loader.lookup(tokens) };
        Ok(())
    })
}

/// vLLM flash-attn KV memory: `num_layers` tensors `[2, num_blocks, block_size, num_kv_heads,
/// head_size]` of `layer_bytes` bytes each, and a block table of `table_len` block ids.
#[repr(C)]
pub struct KvfsBlocks {
    pub layers: *const *mut c_void,
    pub num_layers: usize,
    pub layer_bytes: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub block_table: *const u32,
    pub table_len: usize,
}

/// # Safety
/// `b` describes valid memory per `kvfs_load`'s contract.
unsafe fn layout_of(l: &Loader, b: &KvfsBlocks) -> Result<(KvLayout, Vec<u32>), Fail> {
    // SAFETY: forwarded.
    let ptrs = unsafe { slice(b.layers, b.num_layers, "layers") }?;
    // SAFETY: forwarded.
    let table = unsafe { slice(b.block_table, b.table_len, "block_table") }?.to_vec();
    let regions: Vec<RawRegion> = ptrs
        .iter()
        .map(|&p| RawRegion::new(p.cast(), b.layer_bytes))
        .collect();
    let s = l.spec();
    // SAFETY: the caller promises the tensors are valid for `layer_bytes` and untouched while
    // the call runs; the call waits for the load before returning.
    let layout = unsafe {
        KvLayout::vllm_flash_attn(
            &regions,
            b.num_blocks,
            b.block_size,
            s.num_kv_heads,
            s.head_dim,
            s.dtype,
        )
    }
    .map_err(|e| Fail(KVFS_ERR_LAYOUT, e.to_string()))?;
    Ok((layout, table))
}

/// A load in progress (opaque to C): from `kvfs_load_start` until `kvfs_load_finish`.
pub struct KvfsLoad {
    handle: LoadHandle,
    start: usize,
    end: usize,
}

/// Starts loading positions `[start, end)` of the sequence `tokens[0..num_tokens]` into
/// `blocks` and returns at once with `*out` (`end` up to `num_tokens`: past the last full
/// chunk is the trailing partial chunk of all `num_tokens`); layers arrive in order, layer 0 first. Then call
/// `kvfs_load_wait_layer` per layer (optional) and always `kvfs_load_finish`.
///
/// # Safety
/// `loader` came from `kvfs_open`; `tokens` is readable for `num_tokens` values; `blocks` is
/// valid and its layer pointers each writable for `layer_bytes` bytes and not touched by
/// anything else until `kvfs_load_finish` returns; `out` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvfs_load_start(
    loader: *const KvfsLoader,
    tokens: *const u32,
    num_tokens: usize,
    start: usize,
    end: usize,
    blocks: *const KvfsBlocks,
    out: *mut *mut KvfsLoad,
) -> c_int {
    guard(|| {
        if loader.is_null() || blocks.is_null() || out.is_null() {
            return Err(invalid("loader, blocks or out is NULL"));
        }
        // SAFETY: valid per the contract.
        let l = unsafe { &(*loader).loader };
        // SAFETY: forwarded.
        let tokens = unsafe { slice(tokens, num_tokens, "tokens") }?;
        // SAFETY: forwarded; `blocks` is non-null and valid.
        let (layout, table) = unsafe { layout_of(l, &*blocks) }?;
        let req = LoadRequest {
            tokens,
            range: Some(start..end),
            ..Default::default()
        };
        // The load keeps its own copies of the layout and the block table.
        let handle = l.load_request(&req, &Dest::host(&layout, BlockMap::Blocks(&table)))?;
        let boxed = Box::into_raw(Box::new(KvfsLoad { handle, start, end }));
        // SAFETY: `out` is non-null and writable per the contract.
        unsafe { *out = boxed };
        Ok(())
    })
}

/// Waits until layer `layer` is in place for every chunk (later layers may still be loading).
/// On a failure it waits for the whole load and returns its code; `kvfs_load_finish` then
/// reports the valid prefix.
///
/// # Safety
/// `load` came from `kvfs_load_start` and was not finished.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvfs_load_wait_layer(load: *const KvfsLoad, layer: usize) -> c_int {
    guard(|| {
        if load.is_null() {
            return Err(invalid("load is NULL"));
        }
        // SAFETY: valid per the contract.
        unsafe { &(*load).handle }.wait_layer(layer)?;
        Ok(())
    })
}

/// Waits for the whole load and frees it. `*loaded` (may be NULL) receives the end of the
/// valid prefix: `end` on success, less when a chunk is missing or corrupt (the code says
/// which).
///
/// # Safety
/// `load` came from `kvfs_load_start`, is not used afterwards; `loaded` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvfs_load_finish(load: *mut KvfsLoad, loaded: *mut usize) -> c_int {
    guard(|| {
        if load.is_null() {
            return Err(invalid("load is NULL"));
        }
        // SAFETY: created by Box::into_raw in kvfs_load_start and freed only here.
        let load = unsafe { Box::from_raw(load) };
        let (start, end) = (load.start, load.end);
        let set_loaded = |v: usize| {
            if !loaded.is_null() {
                // SAFETY: writable per the contract.
                unsafe { *loaded = v };
            }
        };
        match load.handle.wait() {
            Ok(_) => {
                set_loaded(end);
                Ok(())
            }
            Err(e) => {
                set_loaded(match &e {
                    LoaderError::Chunk { valid_tokens, .. } => valid_tokens.end,
                    _ => start,
                });
                Err(e.into())
            }
        }
    })
}

/// Loads positions `[start, end)` of the sequence `tokens[0..num_tokens]` from the cache into
/// `blocks` and waits for it (`kvfs_load_start` + `kvfs_load_finish`). `*loaded` (may be NULL)
/// receives the end of the valid prefix: `end` on success, less when a chunk is missing or
/// corrupt (then the code says which).
///
/// # Safety
/// As `kvfs_load_start`, with `loaded` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvfs_load(
    loader: *const KvfsLoader,
    tokens: *const u32,
    num_tokens: usize,
    start: usize,
    end: usize,
    blocks: *const KvfsBlocks,
    loaded: *mut usize,
) -> c_int {
    if !loaded.is_null() {
        // SAFETY: writable per the contract.
        unsafe { *loaded = start.min(end) };
    }
    let mut load: *mut KvfsLoad = std::ptr::null_mut();
    // SAFETY: forwarded from this function's contract; `load` is a writable local.
    let rc = unsafe { kvfs_load_start(loader, tokens, num_tokens, start, end, blocks, &mut load) };
    if rc != KVFS_OK {
        return rc;
    }
    // SAFETY: `load` came from kvfs_load_start just now and is finished exactly once.
    unsafe { kvfs_load_finish(load, loaded) }
}

/// Stores the full chunks of `tokens[0..num_tokens]` that are not cached yet, reading their
/// KV from `blocks`. `*written` (may be NULL) receives the number of chunks written.
///
/// # Safety
/// As `kvfs_load`, with the layer memory readable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvfs_store(
    loader: *const KvfsLoader,
    tokens: *const u32,
    num_tokens: usize,
    blocks: *const KvfsBlocks,
    written: *mut usize,
) -> c_int {
    // SAFETY: forwarded from this function's contract.
    unsafe { store(loader, tokens, num_tokens, blocks, written, false) }
}

/// As `kvfs_store`, and the trailing partial chunk of `tokens[0..num_tokens]` too (when
/// `num_tokens` is not a multiple of the chunk size): a later `kvfs_lookup` of exactly these
/// tokens then reports all `num_tokens`, and a load may reach the last token. Call it once a
/// prompt's prefill is complete.
///
/// # Safety
/// As `kvfs_store`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvfs_store_with_tail(
    loader: *const KvfsLoader,
    tokens: *const u32,
    num_tokens: usize,
    blocks: *const KvfsBlocks,
    written: *mut usize,
) -> c_int {
    // SAFETY: forwarded from this function's contract.
    unsafe { store(loader, tokens, num_tokens, blocks, written, true) }
}

/// `kvfs_store` (`tail` false) and `kvfs_store_with_tail`.
///
/// # Safety
/// As `kvfs_store`.
unsafe fn store(
    loader: *const KvfsLoader,
    tokens: *const u32,
    num_tokens: usize,
    blocks: *const KvfsBlocks,
    written: *mut usize,
    tail: bool,
) -> c_int {
    guard(|| {
        if loader.is_null() || blocks.is_null() {
            return Err(invalid("loader or blocks is NULL"));
        }
        // SAFETY: valid per the contract.
        let l = unsafe { &(*loader).loader };
        // SAFETY: forwarded.
        let tokens = unsafe { slice(tokens, num_tokens, "tokens") }?;
        // SAFETY: forwarded; `blocks` is non-null and valid.
        let (layout, table) = unsafe { layout_of(l, &*blocks) }?;
        let src = Dest::host(&layout, BlockMap::Blocks(&table));
        let stats = if tail {
            l.store_with_tail(tokens, &src)?
        } else {
            l.store(tokens, &src)?
        };
        if !written.is_null() {
            // SAFETY: writable per the contract.
            unsafe { *written = stats.written };
        }
        Ok(())
    })
}

/// Buckets of each latency histogram of [`KvfsMetrics`]: one per bound
/// ([`kvfs_latency_bound`]), and a last one for what exceeds them all.
pub const KVFS_LATENCY_BUCKETS: usize = 15;
const _: () = assert!(KVFS_LATENCY_BUCKETS == crate::metrics::LATENCY_BUCKETS);

/// A latency histogram: per-bucket counts (not cumulative), their total, and the sum of the
/// observations in seconds.
#[repr(C)]
pub struct KvfsHistogram {
    pub buckets: [u64; KVFS_LATENCY_BUCKETS],
    pub count: u64,
    pub sum_seconds: f64,
}

/// This process's loader counters since it started (every field only grows; see
/// `kvfs_loader::metrics`): lookups, the tokens asked about and the cached tokens found;
/// loads finished and failed, with the chunks, tokens and bytes of the finished ones and their
/// latency per request and per layer (time to each layer in place); stores.
#[repr(C)]
pub struct KvfsMetrics {
    pub lookups: u64,
    pub lookup_tokens: u64,
    pub hit_tokens: u64,
    pub loads: u64,
    pub load_failures: u64,
    pub chunks_loaded: u64,
    pub tokens_loaded: u64,
    pub bytes_loaded: u64,
    pub load_seconds: KvfsHistogram,
    pub layer_ready_seconds: KvfsHistogram,
    pub stores: u64,
    pub chunks_stored: u64,
    pub bytes_stored: u64,
}

fn histogram(h: &crate::metrics::HistogramSnapshot) -> KvfsHistogram {
    KvfsHistogram {
        buckets: h.buckets,
        count: h.count,
        sum_seconds: h.sum_seconds,
    }
}

/// Copies this process's loader counters into `*out`.
///
/// # Safety
/// `out` is NULL (then `KVFS_ERR_INVALID`) or points to writable memory for a `KvfsMetrics`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvfs_metrics(out: *mut KvfsMetrics) -> c_int {
    guard(|| {
        if out.is_null() {
            return Err(invalid("out is NULL"));
        }
        let m = crate::metrics::global().snapshot();
        let v = KvfsMetrics {
            lookups: m.lookups,
            lookup_tokens: m.lookup_tokens,
            hit_tokens: m.hit_tokens,
            loads: m.loads,
            load_failures: m.load_failures,
            chunks_loaded: m.chunks_loaded,
            tokens_loaded: m.tokens_loaded,
            bytes_loaded: m.bytes_loaded,
            load_seconds: histogram(&m.load_seconds),
            layer_ready_seconds: histogram(&m.layer_ready_seconds),
            stores: m.stores,
            chunks_stored: m.chunks_stored,
            bytes_stored: m.bytes_stored,
        };
        // SAFETY: non-null and writable per the contract.
        unsafe { out.write(v) };
        Ok(())
    })
}

/// Upper bound in seconds of latency bucket `i` of a [`KvfsHistogram`] (infinity for the
/// last bucket and past it).
#[unsafe(no_mangle)]
pub extern "C" fn kvfs_latency_bound(i: usize) -> f64 {
    crate::metrics::LATENCY_BOUNDS
        .get(i)
        .copied()
        .unwrap_or(f64::INFINITY)
}

/// Tokens per chunk of the loader's model (lookups and stores work in these units).
///
/// # Safety
/// `loader` came from `kvfs_open`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvfs_chunk_tokens(loader: *const KvfsLoader) -> usize {
    if loader.is_null() {
        return 0;
    }
    // SAFETY: valid per the contract.
    unsafe { (*loader).loader.spec().chunk_tokens as usize }
}

impl From<PrefetchError> for Fail {
    fn from(e: PrefetchError) -> Self {
        let code = match &e {
            PrefetchError::Budget(_) | PrefetchError::Periods(_) => KVFS_ERR_INVALID,
            PrefetchError::NoImportance { .. } => KVFS_ERR_NO_IMPORTANCE,
            PrefetchError::Header { source, .. } => match source {
                FormatError::Io(io) if io.kind() == std::io::ErrorKind::NotFound => {
                    KVFS_ERR_MISSING
                }
                FormatError::Io(_) => KVFS_ERR_IO,
                _ => KVFS_ERR_CORRUPT,
            },
            PrefetchError::Loader(l) => code_of(l),
        };
        Fail(code, e.to_string())
    }
}

/// Copies `n` values into `out` (capacity `cap`), or only reports `n` when `out` is NULL.
///
/// # Safety
/// `out` is NULL or writable for `cap` values.
unsafe fn copy_out<T: Copy>(values: &[T], out: *mut T, cap: usize, what: &str) -> Result<(), Fail> {
    if out.is_null() {
        return Ok(());
    }
    if cap < values.len() {
        return Err(invalid(format!(
            "{what} holds {cap} values, {} are needed",
            values.len()
        )));
    }
    // SAFETY: `out` is writable for `cap >= values.len()` values per the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), out, values.len()) };
    Ok(())
}

/// The importance stored in the headers of the chunks covering positions `[0, upto)` of
/// `tokens[0..num_tokens]` (no payload is read): for each chunk, each layer and each group of
/// `group_tokens` tokens, the share of the writing prompt's attention the group drew, as
/// `scores[(chunk * num_layers + layer) * groups_per_chunk + group]`. `*num_chunks` and
/// `*groups_per_chunk` are set first; pass `scores = NULL` to learn the size
/// (`num_chunks * num_layers * groups_per_chunk` floats), then call again with `capacity` at
/// least that. Errors: `KVFS_ERR_NO_IMPORTANCE` (a chunk has none), `KVFS_ERR_MISSING`,
/// `KVFS_ERR_CORRUPT`, `KVFS_ERR_INVALID` (`upto` past the full chunks, a short buffer).
///
/// # Safety
/// `loader` came from `kvfs_open`; `tokens` is readable for `num_tokens` values; `scores` is
/// NULL or writable for `capacity` floats; `num_chunks` and `groups_per_chunk` are writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvfs_importance(
    loader: *const KvfsLoader,
    tokens: *const u32,
    num_tokens: usize,
    upto: usize,
    scores: *mut f32,
    capacity: usize,
    num_chunks: *mut usize,
    groups_per_chunk: *mut usize,
) -> c_int {
    guard(|| {
        if loader.is_null() || num_chunks.is_null() || groups_per_chunk.is_null() {
            return Err(invalid("loader, num_chunks or groups_per_chunk is NULL"));
        }
        // SAFETY: valid per the contract.
        let l = unsafe { &(*loader).loader };
        // SAFETY: forwarded from this function's contract.
        let tokens = unsafe { slice(tokens, num_tokens, "tokens") }?;
        let imps = l.prefix_importance(tokens, upto)?;
        let groups = l.spec().chunk_tokens.div_ceil(l.spec().group_tokens) as usize;
        // SAFETY: writable per the contract.
        unsafe {
            *num_chunks = imps.len();
            *groups_per_chunk = groups;
        }
        let flat: Vec<f32> = imps
            .iter()
            .flat_map(|imp| (0..imp.num_layers()).flat_map(move |layer| imp.layer(layer)))
            .copied()
            .collect();
        // SAFETY: forwarded from this function's contract.
        unsafe { copy_out(&flat, scores, capacity, "scores") }
    })
}

/// The groups a pruned load keeps: per layer, the best `share` (in `(0, 1]`) of the groups
/// of positions `[0, upto)` by the importance in the chunk headers, ranked over the whole
/// prefix (`Loader::importance_selection`). Groups are numbered over the prefix chunk by
/// chunk (group `g` is group `g % groups_per_chunk` of chunk `g / groups_per_chunk`); every
/// layer keeps the same count, `*per_layer`, written to `groups` layer by layer, each layer's
/// ascending: `groups[layer * *per_layer + i]`. Pass `groups = NULL` to learn `*per_layer`
/// (the buffer needs `num_layers * *per_layer` values). Errors as `kvfs_importance`, and
/// `KVFS_ERR_INVALID` for a share outside `(0, 1]`.
///
/// # Safety
/// `loader` came from `kvfs_open`; `tokens` is readable for `num_tokens` values; `groups` is
/// NULL or writable for `capacity` values; `per_layer` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvfs_importance_selection(
    loader: *const KvfsLoader,
    tokens: *const u32,
    num_tokens: usize,
    upto: usize,
    share: f64,
    groups: *mut u32,
    capacity: usize,
    per_layer: *mut usize,
) -> c_int {
    guard(|| {
        if loader.is_null() || per_layer.is_null() {
            return Err(invalid("loader or per_layer is NULL"));
        }
        // SAFETY: valid per the contract.
        let l = unsafe { &(*loader).loader };
        // SAFETY: forwarded from this function's contract.
        let tokens = unsafe { slice(tokens, num_tokens, "tokens") }?;
        let sel = l.importance_selection(tokens, upto, share)?;
        let k = sel.groups(0).len();
        if (0..sel.num_layers()).any(|layer| sel.groups(layer).len() != k) {
            return Err(Fail(KVFS_ERR_PANIC, "layers kept unequal counts".into()));
        }
        // SAFETY: writable per the contract.
        unsafe { *per_layer = k };
        let flat: Vec<u32> = (0..sel.num_layers())
            .flat_map(|layer| sel.groups(layer).iter().copied())
            .collect();
        // SAFETY: forwarded from this function's contract.
        unsafe { copy_out(&flat, groups, capacity, "groups") }
    })
}
