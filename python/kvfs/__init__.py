"""kvfs: KV-cache chunks for LLM serving.

The loader (`Loader`, `ModelSpec`, `KvLayout`, `LoadHandle`) is the Rust `kvfs-loader` crate
(`kvfs._native`); `kvfs.vllm.KvfsConnector` is the vLLM KV connector built on it.

Engine memory is given as integer addresses and byte strides. `layout_from_views` builds a
`KvLayout` from per-layer K and V views of torch tensors (anything with `data_ptr()`,
`stride()`, `shape` and `element_size()`), shaped `[num_blocks, num_kv_heads, block_size,
head_dim]` in any memory order.

KV caches in GPU memory (tensors with `is_cuda`) get a device layout and load through
`CudaBackend` (GDS or pinned staging, chosen by a probe; `CudaUnavailable` says why when the
machine has neither). The package links no CUDA: the same build serves both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._native import (
    ChunkError,
    CudaBackend,
    CudaUnavailable,
    DeviceError,
    DeviceLoadHandle,
    InvalidRequest,
    KvfsError,
    KvfsIOError,
    KvLayout,
    LayoutError,
    LoadHandle,
    Loader,
    ModelSpec,
    SpecError,
    StoreError,
    StoreSnapshot,
    cuda_probe,
    loader_metrics,
)

__all__ = [
    "ChunkError",
    "CudaBackend",
    "CudaUnavailable",
    "DeviceError",
    "DeviceLoadHandle",
    "InvalidRequest",
    "KvfsError",
    "KvfsIOError",
    "KvLayout",
    "LayoutError",
    "LoadHandle",
    "Loader",
    "ModelSpec",
    "SpecError",
    "StoreError",
    "StoreSnapshot",
    "cuda_probe",
    "layout_from_views",
    "loader_metrics",
]

_DTYPES = {
    "torch.float16": "f16",
    "torch.bfloat16": "bf16",
    "torch.float32": "f32",
    "torch.float8_e4m3fn": "fp8_e4m3",
    "torch.float8_e5m2": "fp8_e5m2",
}


def _extent(view: Any) -> int:
    """Bytes from `view.data_ptr()` to the end of its last element."""
    last = sum((n - 1) * s for n, s in zip(view.shape, view.stride()))
    return (last + 1) * view.element_size()


def layout_from_views(k: Sequence[Any], v: Sequence[Any]) -> KvLayout:
    """A `KvLayout` over per-layer K and V views shaped `[num_blocks, num_kv_heads,
    block_size, head_dim]`, with any strides (a view may be a transpose). Every layer's K views
    share one stride, and so do its V views. Each view bounds its layer's memory by its own
    extent. The caller keeps the tensors alive while loads and stores run."""
    if not k or len(k) != len(v):
        raise LayoutError(f"{len(k)} K views and {len(v)} V views")
    first = k[0]
    if len(first.shape) != 4:
        raise LayoutError(
            f"K view of shape {tuple(first.shape)}: want [blocks, heads, block_size, head_dim]"
        )
    for views in (k, v):
        geometry = (tuple(views[0].shape), tuple(views[0].stride()))
        for t in views:
            if (tuple(t.shape), tuple(t.stride())) != geometry or str(t.dtype) != str(first.dtype):
                raise LayoutError("all K views (and all V views) must share shape, stride, dtype")
    if tuple(v[0].shape) != tuple(first.shape) or v[0].stride()[0] != first.stride()[0]:
        raise LayoutError("K and V views must share shape and block stride")
    num_blocks, heads, block_size, head_dim = first.shape
    dtype = _DTYPES.get(str(first.dtype))
    if dtype is None:
        raise LayoutError(f"unsupported KV dtype {first.dtype}")
    es = first.element_size()
    on_cuda = {bool(getattr(t, "is_cuda", False)) for t in (*k, *v)}
    if len(on_cuda) != 1:
        raise LayoutError("K and V views must all be on the host or all on a CUDA device")

    def strides(t: Any) -> tuple[int, int, int]:
        _, sh, st, se = t.stride()
        return (st * es, sh * es, se * es)

    return KvLayout(
        [(t.data_ptr(), _extent(t)) for t in k],
        [(t.data_ptr(), _extent(t)) for t in v],
        dtype=dtype,
        num_kv_heads=heads,
        head_dim=head_dim,
        num_blocks=num_blocks,
        block_size=block_size,
        block_stride=first.stride()[0] * es,
        k_strides=strides(first),
        v_strides=strides(v[0]),
        device="cuda" if on_cuda.pop() else "cpu",
    )
