//! `kvfs._native`: the kvfs loader for Python engines (PyO3).
//!
//! A thin binding over `kvfs-loader`; the Python package `kvfs` re-exports it and adds the vLLM
//! KV connector (`kvfs.vllm`) in Python. The design follows the Rust API one to one:
//!
//! - [`PySpec`] (`kvfs.ModelSpec`): what makes KV bytes reusable; its namespace directory.
//! - [`PyLayout`] (`kvfs.KvLayout`): engine KV memory as integer addresses (a torch tensor's
//!   `data_ptr()`) and byte strides. Python cannot promise Rust's aliasing rules, so the
//!   constructor checks every region against the shape (as the Rust constructors do) and the
//!   Python caller keeps the tensors alive (`kvfs.vllm` holds them for the engine's life).
//! - [`PyLoader`] (`kvfs.Loader`): `lookup`, `load` (returns a [`PyLoadHandle`] at once; reads
//!   run on the loader's threads), `store` (optionally with each chunk's importance) and
//!   `importance_selection` (the groups a pruned load keeps, from the headers: [`importance`]).
//! - [`PyLoadHandle`] (`kvfs.LoadHandle`): `wait_layer(i)` per layer, `wait()` for the rest.
//! - [`PySnapshot`] (`kvfs.StoreSnapshot`): the rows of a store copied out of engine memory
//!   (`Loader.snapshot`), stored later by `Loader.store_snapshot` on any thread, so an engine's
//!   step does not wait on hashing and the disk.
//! - [`loader_metrics`] (`kvfs.loader_metrics()`): this process's loader counters and latency
//!   histograms (`kvfs_loader::metrics`), which the vLLM connector reports.
//!
//! Every call that does I/O or waits releases the GIL (`Python::detach`), so an engine's other
//! Python threads run meanwhile. Errors are typed Python exceptions, all subclasses of
//! `kvfs.KvfsError`: `SpecError`, `LayoutError`, `InvalidRequest`, `StoreError`, `KvfsIOError`
//! and `ChunkError`, which carries the valid prefix (`valid_tokens`, `valid_blocks`) of a load
//! that hit a missing, corrupt or unreadable chunk.

use kvfs_loader::layout::{LayoutKind, PlaneStrides, Strides};
use kvfs_loader::{
    BlockMap, Dest, Dtype, IoMode, KvKind, KvLayout, LoadHandle, LoadRequest, LoadStats, Loader,
    LoaderError, LoaderOptions, ModelSpec, RawRegion, StoreSnapshot, StoreStats, Verify,
};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;
use std::sync::Mutex;

mod cuda;
mod importance;

create_exception!(
    kvfs,
    KvfsError,
    PyException,
    "Base class of every kvfs error."
);
create_exception!(kvfs, SpecError, KvfsError, "The model spec is invalid.");
create_exception!(
    kvfs,
    LayoutError,
    KvfsError,
    "Engine memory does not fit the layout, the model spec or the block ids."
);
create_exception!(
    kvfs,
    InvalidRequest,
    KvfsError,
    "A request is malformed (a range beyond the cached chunks, a bad option)."
);
create_exception!(
    kvfs,
    KvfsIOError,
    KvfsError,
    "The chunk directory cannot be opened or read."
);
create_exception!(kvfs, StoreError, KvfsError, "A chunk could not be stored.");
create_exception!(
    kvfs,
    ChunkError,
    KvfsError,
    "A chunk of a load is missing, corrupt or unreadable. Attributes: `chunk` (its index in \
     the prompt), `path`, `valid_tokens` (end of the loaded valid prefix of the request) and \
     `valid_blocks` (block ids whose requested slots all hold valid data)."
);

/// The Python exception for a loader error.
fn to_py(e: LoaderError) -> PyErr {
    let msg = e.to_string();
    match e {
        LoaderError::Spec(_) => SpecError::new_err(msg),
        LoaderError::Io { .. } => KvfsIOError::new_err(msg),
        LoaderError::Invalid(_) => InvalidRequest::new_err(msg),
        LoaderError::Layout(_) => LayoutError::new_err(msg),
        LoaderError::Store { .. } => StoreError::new_err(msg),
        LoaderError::Chunk {
            chunk,
            path,
            valid_tokens,
            valid_blocks,
            ..
        } => Python::attach(|py| {
            let err = ChunkError::new_err(msg);
            let value = err.value(py);
            let attrs = [
                value.setattr("chunk", chunk),
                value.setattr("path", path.to_string_lossy().into_owned()),
                value.setattr("valid_tokens", valid_tokens.end),
                value.setattr("valid_blocks", valid_blocks),
            ];
            match attrs.into_iter().find_map(Result::err) {
                Some(e) => e,
                None => err,
            }
        }),
    }
}

fn parse_dtype(s: &str) -> PyResult<Dtype> {
    Dtype::parse(s).ok_or_else(|| SpecError::new_err(format!("unknown dtype `{s}`")))
}

fn parse_verify(s: &str) -> PyResult<Verify> {
    match s {
        "header" => Ok(Verify::Header),
        "full" => Ok(Verify::Full),
        _ => Err(InvalidRequest::new_err(format!(
            "verify must be `header` or `full`, not `{s}`"
        ))),
    }
}

/// What makes KV bytes reusable: two engines share chunks exactly when their specs are equal.
#[pyclass(name = "ModelSpec", module = "kvfs", frozen)]
#[derive(Clone)]
struct PySpec {
    spec: ModelSpec,
}

#[pymethods]
impl PySpec {
    #[new]
    #[pyo3(signature = (model, dtype, num_layers, num_kv_heads, head_dim, *, revision = String::new(),
        tp_size = 1, tp_rank = 0, rope_theta = 10000.0, rope_scaling = String::new(),
        chunk_tokens = 256, group_tokens = 16, mla = false, codec = "raw"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        model: &str,
        dtype: &str,
        num_layers: u32,
        num_kv_heads: u32,
        head_dim: u32,
        revision: String,
        tp_size: u32,
        tp_rank: u32,
        rope_theta: f64,
        rope_scaling: String,
        chunk_tokens: u32,
        group_tokens: u32,
        mla: bool,
        codec: &str,
    ) -> PyResult<Self> {
        let mut spec = ModelSpec::new(
            model,
            parse_dtype(dtype)?,
            num_layers,
            num_kv_heads,
            head_dim,
        );
        spec.revision = revision;
        spec.tp_size = tp_size;
        spec.tp_rank = tp_rank;
        spec.rope_theta = rope_theta;
        spec.rope_scaling = rope_scaling;
        spec.chunk_tokens = chunk_tokens;
        spec.group_tokens = group_tokens;
        if mla {
            spec.kv_kind = KvKind::MlaLatent;
        }
        spec.codec =
            kvfs_loader::Codec::parse(codec).map_err(|e| SpecError::new_err(e.to_string()))?;
        spec.validate()
            .map_err(|e| SpecError::new_err(e.to_string()))?;
        Ok(PySpec { spec })
    }

    /// A named preset (`ModelSpec.PRESETS` in Rust), e.g. `llama-3-8b`.
    #[staticmethod]
    fn preset(name: &str) -> PyResult<Self> {
        ModelSpec::preset(name)
            .map(|spec| PySpec { spec })
            .ok_or_else(|| SpecError::new_err(format!("no preset named `{name}`")))
    }

    #[getter]
    fn model(&self) -> &str {
        &self.spec.model
    }
    #[getter]
    fn revision(&self) -> &str {
        &self.spec.revision
    }
    #[getter]
    fn dtype(&self) -> &'static str {
        self.spec.dtype.name()
    }
    #[getter]
    fn num_layers(&self) -> u32 {
        self.spec.num_layers
    }
    #[getter]
    fn num_kv_heads(&self) -> u32 {
        self.spec.num_kv_heads
    }
    #[getter]
    fn head_dim(&self) -> u32 {
        self.spec.head_dim
    }
    #[getter]
    fn tp_size(&self) -> u32 {
        self.spec.tp_size
    }
    #[getter]
    fn tp_rank(&self) -> u32 {
        self.spec.tp_rank
    }
    #[getter]
    fn chunk_tokens(&self) -> u32 {
        self.spec.chunk_tokens
    }
    /// Directory name of the namespace: a slug of the model and 16 hex digits of its id.
    #[getter]
    fn namespace_dir(&self) -> String {
        self.spec.namespace_dir()
    }
    /// The namespace id (64 hex digits).
    #[getter]
    fn namespace_id(&self) -> String {
        self.spec.namespace_id().to_hex()
    }
    fn __eq__(&self, other: &PySpec) -> bool {
        self.spec == other.spec
    }
    fn __repr__(&self) -> String {
        let s = &self.spec;
        format!(
            "ModelSpec(model={:?}, revision={:?}, dtype={:?}, num_layers={}, num_kv_heads={}, \
             head_dim={}, tp_size={}, tp_rank={}, chunk_tokens={})",
            s.model,
            s.revision,
            s.dtype.name(),
            s.num_layers,
            s.num_kv_heads,
            s.head_dim,
            s.tp_size,
            s.tp_rank,
            s.chunk_tokens
        )
    }
}

/// Engine KV memory: per layer a K and a V base address, and byte strides shared by all
/// layers. Element `e` of head `h` of slot `s` (block `s // block_size`) of a plane is at
/// `base + (s // block_size) * block_stride + (s % block_size) * token + h * head + e * elem`,
/// with `(token, head, elem)` that plane's strides.
#[pyclass(name = "KvLayout", module = "kvfs", frozen)]
struct PyLayout {
    layout: KvLayout,
    /// The addresses are CUDA device memory (`device="cuda"`): only `CudaBackend` moves
    /// bytes through this layout.
    device: bool,
}

#[pymethods]
impl PyLayout {
    /// `k` and `v`: per layer `(address, bytes)`: the base of the plane and how many bytes
    /// from there the caller's memory holds (every value must fit: checked). `k_strides` and
    /// `v_strides`: `(token, head, elem)` in bytes. The memory must stay allocated and be left
    /// alone by others while a load or store using this layout runs. `device`: `cpu` (host
    /// memory, `Loader.load`) or `cuda` (device memory of the process's CUDA context, loaded
    /// through `CudaBackend`).
    #[new]
    #[pyo3(signature = (k, v, *, dtype, num_kv_heads, head_dim, num_blocks, block_size,
        block_stride, k_strides, v_strides, device = "cpu"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        k: Vec<(usize, usize)>,
        v: Vec<(usize, usize)>,
        dtype: &str,
        num_kv_heads: u32,
        head_dim: u32,
        num_blocks: usize,
        block_size: usize,
        block_stride: usize,
        k_strides: (usize, usize, usize),
        v_strides: (usize, usize, usize),
        device: &str,
    ) -> PyResult<Self> {
        let dtype = parse_dtype(dtype)?;
        let device = match device {
            "cpu" => false,
            "cuda" => true,
            _ => {
                return Err(LayoutError::new_err(format!(
                    "device must be `cpu` or `cuda`, not `{device}`"
                )));
            }
        };
        if k.len() != v.len() {
            return Err(LayoutError::new_err(format!(
                "{} K regions but {} V regions",
                k.len(),
                v.len()
            )));
        }
        let region = |(ptr, len): (usize, usize)| RawRegion::new(ptr as *mut u8, len);
        let planes: Vec<Vec<RawRegion>> = k
            .into_iter()
            .zip(v)
            .map(|(k, v)| vec![region(k), region(v)])
            .collect();
        let strides = Strides {
            block_size,
            num_blocks,
            block_stride,
            token_stride: 0,
        };
        let plane = |(token, head, elem): (usize, usize, usize)| PlaneStrides { token, head, elem };
        // SAFETY: the Python caller owns the memory and, as documented on this constructor,
        // keeps it allocated and otherwise untouched while loads and stores run; every region
        // is checked against the shape here, so no value reaches past the memory named.
        let layout = unsafe {
            KvLayout::from_raw_strided(
                LayoutKind::Custom,
                dtype,
                KvKind::KeyValue,
                num_kv_heads,
                head_dim,
                strides,
                &[plane(k_strides), plane(v_strides)],
                &planes,
            )
        }
        .map_err(|e| LayoutError::new_err(e.to_string()))?;
        Ok(PyLayout { layout, device })
    }

    /// `cpu` or `cuda`: where the layout's memory is.
    #[getter]
    fn device(&self) -> &'static str {
        if self.device { "cuda" } else { "cpu" }
    }

    #[getter]
    fn num_layers(&self) -> usize {
        self.layout.num_layers()
    }
    #[getter]
    fn num_blocks(&self) -> usize {
        self.layout.num_blocks()
    }
    #[getter]
    fn block_size(&self) -> usize {
        self.layout.block_size()
    }
    /// Address of the first value (head 0, element 0) of `slot` in `plane` (0 = K, 1 = V)
    /// of `layer`.
    fn slot_addr(&self, layer: usize, plane: usize, slot: usize) -> PyResult<usize> {
        if layer >= self.layout.num_layers()
            || plane >= self.layout.planes()
            || slot >= self.layout.num_blocks() * self.layout.block_size()
        {
            return Err(LayoutError::new_err(format!(
                "layer {layer}, plane {plane}, slot {slot} is outside the layout"
            )));
        }
        Ok(self.layout.slot_addr(layer, plane, slot))
    }
}

fn stats_dict<'py>(py: Python<'py>, s: &LoadStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("chunks", s.chunks)?;
    d.set_item("tokens", s.tokens)?;
    d.set_item("bytes_needed", s.bytes_needed)?;
    d.set_item("bytes_read", s.bytes_read)?;
    d.set_item("direct_files", s.direct_files)?;
    d.set_item("buffered_files", s.buffered_files)?;
    d.set_item("backing_files", s.backing_files)?;
    d.set_item("elapsed_s", s.elapsed.as_secs_f64())?;
    let ready: Vec<f64> = s.layer_ready.iter().map(|d| d.as_secs_f64()).collect();
    d.set_item("layer_ready_s", ready)?;
    Ok(d)
}

fn store_dict<'py>(py: Python<'py>, s: &StoreStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("written", s.written)?;
    d.set_item("present", s.present)?;
    d.set_item("bytes_written", s.bytes_written)?;
    Ok(d)
}

/// The load a Python handle (`LoadHandle`, `DeviceLoadHandle`) holds until it is waited for
/// or cancelled, once: afterwards every call is `InvalidRequest`.
pub(crate) struct PendingLoad<T>(Mutex<Option<T>>);

impl<T> PendingLoad<T> {
    pub(crate) fn new(load: T) -> Self {
        PendingLoad(Mutex::new(Some(load)))
    }

    /// `f` on the load, while it has not been taken.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&T) -> R) -> PyResult<R> {
        let guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(h) => Ok(f(h)),
            None => Err(InvalidRequest::new_err("the load was already waited for")),
        }
    }

    /// The load, for `wait`; an error when it was taken already.
    pub(crate) fn take(&self) -> PyResult<T> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| InvalidRequest::new_err("the load was already waited for"))
    }

    /// Drops the load (waiting for what is in flight) with the GIL released.
    pub(crate) fn cancel(&self, py: Python<'_>)
    where
        T: Send,
    {
        let h = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        py.detach(|| drop(h));
    }
}

/// A load in progress. Waiting releases the GIL. Dropping it (or `cancel()`) stops reads not
/// started and waits for those in flight, so nothing lands in engine memory afterwards.
#[pyclass(name = "LoadHandle", module = "kvfs", frozen)]
struct PyLoadHandle {
    load: PendingLoad<LoadHandle>,
    num_layers: usize,
}

#[pymethods]
impl PyLoadHandle {
    #[getter]
    fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Returns once `layer` is in place for every chunk; raises `ChunkError` on a failure.
    fn wait_layer(&self, py: Python<'_>, layer: usize) -> PyResult<()> {
        py.detach(|| self.load.with(|h| h.wait_layer(layer)))?
            .map_err(to_py)
    }

    /// Whether every read has finished.
    fn done(&self) -> PyResult<bool> {
        self.load.with(|h| h.is_done())
    }

    /// Waits for the whole load; returns its figures as a dict, or raises `ChunkError`.
    fn wait<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let h = self.load.take()?;
        let stats = py.detach(|| h.wait()).map_err(to_py)?;
        stats_dict(py, &stats)
    }

    /// Cancels reads not started and waits for those in flight.
    fn cancel(&self, py: Python<'_>) {
        self.load.cancel(py)
    }
}

/// Rows of the chunks a store will write, copied out of engine memory by `Loader.snapshot`;
/// `Loader.store_snapshot` writes them (on any thread; the GIL is released).
#[pyclass(name = "StoreSnapshot", module = "kvfs", frozen)]
struct PySnapshot {
    snap: StoreSnapshot,
}

#[pymethods]
impl PySnapshot {
    /// Bytes of KV held.
    #[getter]
    fn bytes(&self) -> usize {
        self.snap.bytes()
    }
    /// `(start, end)`: the token positions held (empty when every chunk was present).
    #[getter]
    fn positions(&self) -> (usize, usize) {
        let r = self.snap.positions();
        (r.start, r.end)
    }
}

/// A loader bound to one chunk directory (a kvfs mount or a cache directory) and one model
/// namespace.
#[pyclass(name = "Loader", module = "kvfs", frozen)]
struct PyLoader {
    loader: Loader,
}

fn block_map(block_ids: &[u32]) -> BlockMap<'_> {
    BlockMap::Blocks(block_ids)
}

/// Host loads and stores refuse a device layout (its addresses are not host memory).
fn host_layout(layout: &PyLayout) -> PyResult<()> {
    if layout.device {
        Err(LayoutError::new_err(
            "this KvLayout describes CUDA memory (device=\"cuda\"): load and store it \
             through kvfs.CudaBackend",
        ))
    } else {
        Ok(())
    }
}

#[pymethods]
impl PyLoader {
    /// Opens `path` for `spec`. `salt` isolates a tenant. `io`: `direct` (O_DIRECT where the
    /// file system allows) or `buffered`; `verify`: `header` or `full` (each layer's digest).
    #[new]
    #[pyo3(signature = (path, spec, salt = b"".to_vec(), *, threads = 4, io = "direct", verify = "header"))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        spec: &PySpec,
        salt: Vec<u8>,
        threads: usize,
        io: &str,
        verify: &str,
    ) -> PyResult<Self> {
        let io = match io {
            "direct" => IoMode::Direct,
            "buffered" => IoMode::Buffered,
            _ => {
                return Err(InvalidRequest::new_err(format!(
                    "io must be `direct` or `buffered`, not `{io}`"
                )));
            }
        };
        let opts = LoaderOptions {
            io,
            verify: parse_verify(verify)?,
            threads: threads.max(1),
            ..Default::default()
        };
        let spec = spec.spec.clone();
        let loader = py
            .detach(|| Loader::open_with(&path, spec, &salt, opts))
            .map_err(to_py)?;
        Ok(PyLoader { loader })
    }

    #[getter]
    fn namespace_dir(&self) -> &str {
        self.loader.namespace_dir()
    }
    #[getter]
    fn chunk_tokens(&self) -> u32 {
        self.loader.spec().chunk_tokens
    }
    #[getter]
    fn spec(&self) -> PySpec {
        PySpec {
            spec: self.loader.spec().clone(),
        }
    }

    /// How many leading tokens of `tokens` are cached: whole chunks up to the first missing,
    /// or all of `tokens` when their trailing partial chunk was stored (`store(tail=True)`).
    fn lookup(&self, py: Python<'_>, tokens: Vec<u32>) -> usize {
        py.detach(|| self.loader.lookup(&tokens))
    }

    /// The file paths of the full chunks of `tokens`, in order (present or not).
    fn chunk_paths(&self, tokens: Vec<u32>) -> Vec<String> {
        self.loader
            .chunk_keys(&tokens)
            .iter()
            .map(|c| {
                self.loader
                    .chunk_path(&c.key)
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    /// Starts loading token positions `start..end` (default: every full chunk) into the
    /// blocks `block_ids` (block `block_ids[p // block_size]` holds position `p`). `end` may
    /// reach `len(tokens)`: past the last full chunk is the trailing partial chunk of all of
    /// `tokens`. Returns at once; bad requests raise before any byte moves.
    #[pyo3(signature = (tokens, layout, block_ids, start = 0, end = None, verify = None))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        &self,
        py: Python<'_>,
        tokens: Vec<u32>,
        layout: &PyLayout,
        block_ids: Vec<u32>,
        start: usize,
        end: Option<usize>,
        verify: Option<&str>,
    ) -> PyResult<PyLoadHandle> {
        let ct = self.loader.spec().chunk_tokens as usize;
        let end = end.unwrap_or(tokens.len() / ct * ct);
        let verify = verify.map(parse_verify).transpose()?;
        host_layout(layout)?;
        let dest = Dest::host(&layout.layout, block_map(&block_ids));
        let req = LoadRequest {
            tokens: &tokens,
            range: Some(start..end),
            verify,
            ..Default::default()
        };
        let handle = py
            .detach(|| self.loader.load_request(&req, &dest))
            .map_err(to_py)?;
        Ok(PyLoadHandle {
            num_layers: handle.num_layers(),
            load: PendingLoad::new(handle),
        })
    }

    /// Stores the full chunks of `tokens` not present yet, reading positions `0..` from the
    /// blocks `block_ids`; with `tail`, the trailing partial chunk of `tokens` too (store it
    /// once the prompt is complete: a later `lookup` of exactly these tokens then finds all of
    /// them). `importance`: per chunk, per layer, per group the attention mass the group drew
    /// (shares of one unit per layer over the prompt) from the prompt's last
    /// `observed_queries` queries, written into chunk headers (format v2; chunks past the list
    /// get none). Returns `{"written", "present", "bytes_written"}`.
    #[pyo3(signature = (tokens, layout, block_ids, importance = None, observed_queries = 32, *, tail = false))]
    #[allow(clippy::too_many_arguments)]
    fn store<'py>(
        &self,
        py: Python<'py>,
        tokens: Vec<u32>,
        layout: &PyLayout,
        block_ids: Vec<u32>,
        importance: Option<Vec<Vec<Vec<f32>>>>,
        observed_queries: u32,
        tail: bool,
    ) -> PyResult<Bound<'py, PyDict>> {
        host_layout(layout)?;
        let imps = importance::from_lists(
            &self.loader,
            importance.unwrap_or_default(),
            observed_queries,
        )?;
        let src = Dest::host(&layout.layout, block_map(&block_ids));
        let stats = py
            .detach(|| self.loader.store_with(&tokens, &src, &imps, tail))
            .map_err(to_py)?;
        store_dict(py, &stats)
    }

    /// Copies the rows that `store(tokens, layout, block_ids, tail=tail)` would write now (the
    /// chunks not present yet) out of the blocks, so the blocks may be reused at once; store
    /// them later with `store_snapshot`. Raises as `store` does on a bad request.
    #[pyo3(signature = (tokens, layout, block_ids, *, tail = false))]
    fn snapshot(
        &self,
        py: Python<'_>,
        tokens: Vec<u32>,
        layout: &PyLayout,
        block_ids: Vec<u32>,
        tail: bool,
    ) -> PyResult<PySnapshot> {
        host_layout(layout)?;
        let src = Dest::host(&layout.layout, block_map(&block_ids));
        let snap = py
            .detach(|| self.loader.snapshot(&tokens, &src, tail))
            .map_err(to_py)?;
        Ok(PySnapshot { snap })
    }

    /// Stores the chunks of a `snapshot` of this loader still absent. Returns
    /// `{"written", "present", "bytes_written"}`; `InvalidRequest` for a snapshot of another
    /// namespace or salt.
    fn store_snapshot<'py>(
        &self,
        py: Python<'py>,
        snapshot: &PySnapshot,
    ) -> PyResult<Bound<'py, PyDict>> {
        let stats = py
            .detach(|| self.loader.store_snapshot(&snapshot.snap))
            .map_err(to_py)?;
        store_dict(py, &stats)
    }

    /// Per layer, the groups a pruned load of positions `0..upto` keeps: the best `share` of
    /// the prefix's groups by the importance in the chunk headers (no payload is read),
    /// numbered over the prefix chunk by chunk ([`importance`]).
    fn importance_selection(
        &self,
        py: Python<'_>,
        tokens: Vec<u32>,
        upto: usize,
        share: f64,
    ) -> PyResult<Vec<Vec<u32>>> {
        let sel = py
            .detach(|| self.loader.importance_selection(&tokens, upto, share))
            .map_err(importance::to_py)?;
        Ok((0..sel.num_layers())
            .map(|l| sel.groups(l).to_vec())
            .collect())
    }
}

fn histogram_dict<'py>(
    py: Python<'py>,
    h: &kvfs_loader::metrics::HistogramSnapshot,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("bounds", kvfs_loader::metrics::LATENCY_BOUNDS.to_vec())?;
    d.set_item("buckets", h.buckets.to_vec())?;
    d.set_item("count", h.count)?;
    d.set_item("sum_seconds", h.sum_seconds)?;
    Ok(d)
}

/// This process's loader counters since it started (every value only grows): lookups,
/// `lookup_tokens` asked about and `hit_tokens` found; `loads` finished and `load_failures`,
/// with the chunks, tokens and bytes loaded; `load_seconds` (per request) and
/// `layer_ready_seconds` (per layer: time to the layer in place) as histograms
/// (`bounds`, per-bucket `buckets` with one more for the overflow, `count`, `sum_seconds`);
/// stores, chunks and bytes stored.
#[pyfunction]
fn loader_metrics(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let m = kvfs_loader::metrics::global().snapshot();
    let d = PyDict::new(py);
    d.set_item("lookups", m.lookups)?;
    d.set_item("lookup_tokens", m.lookup_tokens)?;
    d.set_item("hit_tokens", m.hit_tokens)?;
    d.set_item("loads", m.loads)?;
    d.set_item("load_failures", m.load_failures)?;
    d.set_item("chunks_loaded", m.chunks_loaded)?;
    d.set_item("tokens_loaded", m.tokens_loaded)?;
    d.set_item("bytes_loaded", m.bytes_loaded)?;
    d.set_item("load_seconds", histogram_dict(py, &m.load_seconds)?)?;
    d.set_item(
        "layer_ready_seconds",
        histogram_dict(py, &m.layer_ready_seconds)?,
    )?;
    d.set_item("stores", m.stores)?;
    d.set_item("chunks_stored", m.chunks_stored)?;
    d.set_item("bytes_stored", m.bytes_stored)?;
    Ok(d)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PySpec>()?;
    m.add_class::<PyLayout>()?;
    m.add_class::<PyLoader>()?;
    m.add_class::<PyLoadHandle>()?;
    m.add_class::<PySnapshot>()?;
    m.add_function(wrap_pyfunction!(loader_metrics, m)?)?;
    m.add("KvfsError", py.get_type::<KvfsError>())?;
    m.add("SpecError", py.get_type::<SpecError>())?;
    m.add("LayoutError", py.get_type::<LayoutError>())?;
    m.add("InvalidRequest", py.get_type::<InvalidRequest>())?;
    m.add("KvfsIOError", py.get_type::<KvfsIOError>())?;
    m.add("StoreError", py.get_type::<StoreError>())?;
    m.add("ChunkError", py.get_type::<ChunkError>())?;
    cuda::register(m)?;
    Ok(())
}
