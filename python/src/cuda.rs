//! `kvfs.CudaBackend` and `kvfs.DeviceLoadHandle`: loads into KV blocks in GPU memory.
//!
//! The extension always contains this module, and still links no CUDA: kvfs-cuda reaches
//! CUDA through kvfs-gds's `dlopen`, so the same wheel serves CPU-only machines (where
//! `CudaBackend()` raises `CudaUnavailable` naming why) and GPU machines. Python decides per
//! KV cache: tensors with `is_cuda` get a device `KvLayout` (`device="cuda"`) and go through a
//! `CudaBackend`; host tensors keep `Loader.load`. The two never mix: a host load into a
//! device layout (or the reverse) is a `LayoutError`, never a wild pointer.
//!
//! - `CudaBackend.load` with `verify="header"` is the direct path: kvfs-cuda's `DevicePlan`
//!   run by the GPU loader (GDS or the pinned staging ring), one CUDA event per layer.
//!   `DeviceLoadHandle.wait_layer(i, stream)` makes the engine's stream (torch's
//!   `current_stream().cuda_stream`) wait for layer `i` on the GPU and returns at once.
//! - With `verify="full"` (digests need host bytes) the load goes through the loader with the
//!   back end as its `Backend` (staged reads, one host-to-device copy per piece); so does
//!   `CudaBackend.store`. Such a handle waits on the host (`stream` is ignored: its copies are
//!   complete when a layer is reported).

use kvfs_cuda::{CudaBackend, CudaError, DeviceLoad, DeviceLoadStats, GpuOptions, ProbeOptions};
use kvfs_loader::{Dest, LoadHandle, LoadRequest, Verify};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;
use std::sync::Arc;

use super::{
    InvalidRequest, KvfsError, LayoutError, PendingLoad, PyLayout, PyLoader, block_map,
    parse_verify, stats_dict, store_dict, to_py,
};

pyo3::create_exception!(
    kvfs,
    CudaUnavailable,
    KvfsError,
    "No CUDA device path on this machine (the message says why: no libcuda, no device, \
     KVFS_GPU_PATH=host, or a forced path that is unavailable)."
);
pyo3::create_exception!(
    kvfs,
    DeviceError,
    KvfsError,
    "A CUDA, cuFile or device I/O call failed during a device load."
);

/// The Python exception for a CUDA back end error.
fn cuda_to_py(e: CudaError) -> PyErr {
    let msg = e.to_string();
    match e {
        CudaError::Loader(e) => to_py(e),
        CudaError::Unavailable { .. } => CudaUnavailable::new_err(msg),
        CudaError::Gpu(
            kvfs_gds::GdsError::PathUnavailable { .. }
            | kvfs_gds::GdsError::InvalidForcedPath { .. },
        ) => CudaUnavailable::new_err(msg),
        CudaError::Unsupported(_) => InvalidRequest::new_err(msg),
        CudaError::Gpu(_) | CudaError::LoadFailed(_) | CudaError::Handle(_) => {
            DeviceError::new_err(msg)
        }
    }
}

fn device_stats<'py>(py: Python<'py>, s: &DeviceLoadStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("path", s.path.name())?;
    d.set_item("chunks", s.chunks)?;
    d.set_item("tokens", s.tokens)?;
    d.set_item("bytes_needed", s.bytes_needed)?;
    d.set_item("bytes_read", s.io.io_bytes)?;
    d.set_item("direct_files", s.direct_files)?;
    d.set_item("buffered_files", s.files - s.direct_files)?;
    d.set_item("elapsed_s", s.elapsed.as_secs_f64())?;
    d.set_item(
        "layer_issued_s",
        s.layer_issued
            .iter()
            .map(|d| d.as_secs_f64())
            .collect::<Vec<_>>(),
    )?;
    Ok(d)
}

/// Loads chunks into KV blocks in GPU memory. `force`: `gds`, `compat` or `staging` (default:
/// `KVFS_GPU_PATH`, else the best the probe finds); `probe_dir`: where cuFile is tried (the
/// chunk directory's file system decides GDS).
#[pyclass(name = "CudaBackend", module = "kvfs", frozen)]
pub(crate) struct PyCudaBackend {
    backend: Arc<CudaBackend>,
}

#[pymethods]
impl PyCudaBackend {
    #[new]
    #[pyo3(signature = (*, force = None, device = 0, probe_dir = None))]
    fn new(
        py: Python<'_>,
        force: Option<&str>,
        device: usize,
        probe_dir: Option<PathBuf>,
    ) -> PyResult<Self> {
        let mut probe = match force {
            Some(f) => ProbeOptions {
                force: Some(kvfs_gds::GpuPath::parse(f).map_err(|e| cuda_to_py(e.into()))?),
                ..Default::default()
            },
            None => ProbeOptions::from_env().map_err(|e| cuda_to_py(e.into()))?,
        };
        probe.device = device;
        if let Some(d) = probe_dir {
            probe.probe_dir = d;
        }
        let opts = GpuOptions {
            probe,
            ..Default::default()
        };
        let backend = py.detach(|| CudaBackend::open(&opts)).map_err(cuda_to_py)?;
        Ok(PyCudaBackend { backend })
    }

    /// `gds`, `compat` or `staging`.
    #[getter]
    fn path(&self) -> &'static str {
        self.backend.path().name()
    }

    /// The probe report: the path and why.
    #[getter]
    fn probe(&self) -> String {
        self.backend.probe().to_string()
    }

    /// Starts loading positions `start..end` of `tokens` into the device blocks `block_ids`
    /// of `layout` (a `KvLayout` made with `device="cuda"`). Returns at once; bad requests and
    /// missing headers raise before any byte moves.
    #[pyo3(signature = (loader, tokens, layout, block_ids, start = 0, end = None, verify = None))]
    #[allow(clippy::too_many_arguments)]
    fn load(
        &self,
        py: Python<'_>,
        loader: &PyLoader,
        tokens: Vec<u32>,
        layout: &PyLayout,
        block_ids: Vec<u32>,
        start: usize,
        end: Option<usize>,
        verify: Option<&str>,
    ) -> PyResult<DeviceLoadHandle> {
        device_layout(layout)?;
        let l = &loader.loader;
        let ct = l.spec().chunk_tokens as usize;
        let end = end.unwrap_or(tokens.len() / ct * ct);
        let verify = verify.map(parse_verify).transpose()?;
        let req = LoadRequest {
            tokens: &tokens,
            range: Some(start..end),
            verify,
            ..Default::default()
        };
        let map = block_map(&block_ids);
        let inner = if verify.unwrap_or(l.options().verify) == Verify::Full {
            let dest = Dest {
                layout: &layout.layout,
                map,
                backend: self.backend.clone(),
            };
            let h = py.detach(|| l.load_request(&req, &dest)).map_err(to_py)?;
            Inner::Staged(h)
        } else {
            // SAFETY: `layout` was made with device="cuda": the Python caller promised its
            // regions are device memory (torch CUDA tensors of the primary context) that it
            // keeps alive and otherwise untouched while loads run (kvfs.vllm holds them).
            let h = py
                .detach(|| unsafe { self.backend.load(l, &req, &layout.layout, &map) })
                .map_err(cuda_to_py)?;
            Inner::Device(h)
        };
        Ok(DeviceLoadHandle {
            num_layers: l.spec().num_layers as usize,
            load: PendingLoad::new(inner),
        })
    }

    /// Stores the full chunks of `tokens` not present yet from the device blocks `block_ids`
    /// (staged through host memory). Returns `{"written", "present", "bytes_written"}`.
    fn store<'py>(
        &self,
        py: Python<'py>,
        loader: &PyLoader,
        tokens: Vec<u32>,
        layout: &PyLayout,
        block_ids: Vec<u32>,
    ) -> PyResult<Bound<'py, PyDict>> {
        device_layout(layout)?;
        let src = Dest {
            layout: &layout.layout,
            map: block_map(&block_ids),
            backend: self.backend.clone(),
        };
        let stats = py
            .detach(|| loader.loader.store(&tokens, &src))
            .map_err(to_py)?;
        store_dict(py, &stats)
    }
}

fn device_layout(layout: &PyLayout) -> PyResult<()> {
    if layout.device {
        Ok(())
    } else {
        Err(LayoutError::new_err(
            "this KvLayout describes host memory (device=\"cpu\"): use Loader.load/store",
        ))
    }
}

/// The probe report of this machine (path and reasons), without opening anything.
#[pyfunction]
#[pyo3(signature = (probe_dir = None))]
pub(crate) fn cuda_probe(py: Python<'_>, probe_dir: Option<PathBuf>) -> PyResult<String> {
    let mut opts = ProbeOptions::from_env().map_err(|e| cuda_to_py(e.into()))?;
    if let Some(d) = probe_dir {
        opts.probe_dir = d;
    }
    Ok(py.detach(|| kvfs_gds::probe(&opts).to_string()))
}

enum Inner {
    Device(DeviceLoad),
    Staged(LoadHandle),
}

/// A device load in progress. `wait_layer(i, stream)` makes `stream` (a `CUstream` as an
/// int, e.g. `torch.cuda.current_stream().cuda_stream`) wait for layer `i` on the GPU;
/// without a stream the host waits. Dropping it (or `cancel()`) waits for copies in flight.
#[pyclass(name = "DeviceLoadHandle", module = "kvfs", frozen)]
pub(crate) struct DeviceLoadHandle {
    load: PendingLoad<Inner>,
    num_layers: usize,
}

#[pymethods]
impl DeviceLoadHandle {
    #[getter]
    fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Whether this load runs on the direct device path (`False`: staged through the
    /// loader, as `verify="full"` needs).
    #[getter]
    fn direct(&self) -> PyResult<bool> {
        self.load.with(|h| matches!(h, Inner::Device(_)))
    }

    /// Layer `layer` usable: on `stream` (GPU-side wait) or, without one, on the host.
    /// Raises `ChunkError` when a chunk ended the load (once its valid prefix is in place).
    #[pyo3(signature = (layer, stream = None))]
    fn wait_layer(&self, py: Python<'_>, layer: usize, stream: Option<usize>) -> PyResult<()> {
        if layer >= self.num_layers {
            return Err(InvalidRequest::new_err(format!(
                "layer {layer} of a {}-layer load",
                self.num_layers
            )));
        }
        py.detach(|| {
            self.load.with(|h| match h {
                // SAFETY: the caller passes a live stream of the process's CUDA context (the
                // engine's current stream); documented on this method.
                Inner::Device(d) => {
                    unsafe { d.wait_layer(layer, stream.map(|s| s as kvfs_cuda::RawStream)) }
                        .map_err(cuda_to_py)
                }
                Inner::Staged(h) => h.wait_layer(layer).map_err(to_py),
            })
        })?
    }

    /// The raw `CUevent` (as an int) recorded after layer `layer`'s copies, blocking until it
    /// is recorded; `None` when the load already finished or runs staged (nothing to wait
    /// for on the GPU). Re-recorded by the backend's next load.
    fn layer_event(&self, py: Python<'_>, layer: usize) -> PyResult<Option<usize>> {
        py.detach(|| {
            self.load.with(|h| match h {
                Inner::Device(d) => d
                    .layer_event(layer)
                    .map(|e| e.map(|p| p as usize))
                    .map_err(cuda_to_py),
                Inner::Staged(h) => h.wait_layer(layer).map(|()| None).map_err(to_py),
            })
        })?
    }

    /// Whether every copy has finished.
    fn done(&self) -> PyResult<bool> {
        self.load.with(|h| match h {
            Inner::Device(d) => d.is_done(),
            Inner::Staged(h) => h.is_done(),
        })
    }

    /// Waits for the whole load; returns its figures, or raises `ChunkError`.
    fn wait<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        match self.load.take()? {
            Inner::Device(d) => {
                let s = py.detach(|| d.wait()).map_err(cuda_to_py)?;
                device_stats(py, &s)
            }
            Inner::Staged(h) => {
                let s = py.detach(|| h.wait()).map_err(to_py)?;
                stats_dict(py, &s)
            }
        }
    }

    /// Waits for copies in flight and drops the load.
    fn cancel(&self, py: Python<'_>) {
        self.load.cancel(py)
    }
}

/// Adds the CUDA classes and exceptions to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyCudaBackend>()?;
    m.add_class::<DeviceLoadHandle>()?;
    m.add_function(wrap_pyfunction!(cuda_probe, m)?)?;
    m.add("CudaUnavailable", py.get_type::<CudaUnavailable>())?;
    m.add("DeviceError", py.get_type::<DeviceError>())?;
    Ok(())
}
