"""The CUDA side of the Python package, on any machine.

With no GPU here, what can run does: the extension links no CUDA (the CPU wheel and the GPU
wheel are one); `CudaBackend` and the connector name why they cannot load into GPU memory;
GPU attention caches (vLLM FLASH_ATTN / FLASHINFER, `[blocks, heads, block_size, 2 *
head_dim]`) get views that round-trip through kvfs on host tensors; and the connector's
dispatch takes the CUDA branch when the KV tensors say `is_cuda`.

The last two need a tensor that says it is on CUDA on a machine without one: `FakeCuda` wraps
a CPU tensor and answers `is_cuda = True`. That is the only way to take the CUDA branch
here; its memory is never handed to CUDA (every call that would is refused first, or goes to
a recording stand-in for `CudaBackend`). On a GPU machine `scripts/gpu-check` runs the real
thing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import required

try:
    import torch

    import kvfs
    import kvfs.vllm as kv

    _missing = ""
except ImportError as e:  # the venv of scripts/install-vllm is not the one running
    _missing = f"kvfs, torch or vllm is not importable ({e}); run scripts/install-vllm"

if _missing:
    if required("vllm"):
        pytest.fail(f"KVFS_REQUIRE includes vllm: {_missing}", pytrace=False)
    pytest.skip(_missing, allow_module_level=True)

HEADS, DIM, BS = 2, 16, 8
NO_CUDA = "GPU path: host" in kvfs.cuda_probe()


class FakeCuda:
    """A CPU tensor that reports CUDA device 0 (see the module docs)."""

    is_cuda = True
    device = torch.device("cuda", 0)

    def __init__(self, t: torch.Tensor):
        self.t = t
        self.shape = t.shape
        self.dtype = t.dtype

    def stride(self):
        return self.t.stride()

    def data_ptr(self) -> int:
        return self.t.data_ptr()

    def element_size(self) -> int:
        return self.t.element_size()

    def dim(self) -> int:
        return self.t.dim()

    def __getitem__(self, idx) -> FakeCuda:
        return FakeCuda(self.t[idx])


def spec(layers: int = 2) -> kvfs.ModelSpec:
    return kvfs.ModelSpec("kvfs/cuda-test", "bf16", layers, HEADS, DIM, revision="t1", chunk_tokens=BS)


def gpu_cache(layers: int, blocks: int, nhd: bool) -> list[torch.Tensor]:
    """vLLM's GPU attention cache per layer, logical `[blocks, heads, block_size, 2 * DIM]`;
    `nhd`: stored token-major (`[blocks, block_size, heads, 2 * DIM]` in memory), as vLLM's
    stride order makes it for FlashAttention."""
    out = []
    for _ in range(layers):
        if nhd:
            t = torch.randn(blocks, BS, HEADS, 2 * DIM).to(torch.bfloat16).permute(0, 2, 1, 3)
        else:
            t = torch.randn(blocks, HEADS, BS, 2 * DIM).to(torch.bfloat16)
        out.append(t)
    return out


def test_the_extension_links_no_cuda() -> None:
    # ldd is Debian's libc-bin (essential): present wherever these tests run
    assert shutil.which("ldd"), "ldd is missing"
    lib = Path(kvfs._native.__file__)
    needed = subprocess.run(["ldd", str(lib)], capture_output=True, text=True, check=True).stdout
    for name in ("libcuda", "libcudart", "libnvrtc", "libcufile"):
        assert name not in needed, f"{lib} links {name}:\n{needed}"


def test_cuda_backend_names_why_it_is_unavailable(tmp_path: Path) -> None:
    if not NO_CUDA:
        assert kvfs.CudaBackend(probe_dir=tmp_path).path in ("gds", "staging")
        return
    with pytest.raises(kvfs.CudaUnavailable, match="libcuda.so.1 not found"):
        kvfs.CudaBackend(probe_dir=tmp_path)
    with pytest.raises(kvfs.CudaUnavailable, match="staging was forced but is unavailable"):
        kvfs.CudaBackend(force="staging")
    with pytest.raises(kvfs.CudaUnavailable, match="KVFS_GPU_PATH=host"):
        kvfs.CudaBackend(force="host")
    with pytest.raises(kvfs.CudaUnavailable, match="turbo"):
        kvfs.CudaBackend(force="turbo")
    # the connector's start-up error says which device and why
    with pytest.raises(kvfs.KvfsError, match="CUDA device 0.*libcuda.so.1 not found"):
        kv.open_cuda_backend(str(tmp_path), 0)


@pytest.mark.parametrize("nhd", [False, True])
def test_gpu_attention_views_round_trip_through_kvfs(tmp_path: Path, nhd: bool) -> None:
    """The views the connector takes of a GPU cache put K and V where the attention kernels
    read them: slot addresses are those of `kv[b, h, o, :DIM]` and `kv[b, h, o, DIM:]`, and a
    store then load through them (on host tensors) gives every requested value back."""
    layers = 2
    kvs = gpu_cache(layers, 4, nhd)
    views = [kv.gpu_attn_views(t, DIM) for t in kvs]
    layout = kvfs.layout_from_views([k for k, _ in views], [v for _, v in views])
    assert layout.device == "cpu"
    es = kvs[0].element_size()
    for layer, t in enumerate(kvs):
        for b, o in [(0, 0), (2, 5), (3, 7)]:
            slot = b * BS + o
            assert layout.slot_addr(layer, 0, slot) == t[b, 0, o].data_ptr()
            assert layout.slot_addr(layer, 1, slot) == t[b, 0, o].data_ptr() + DIM * es
    loader = kvfs.Loader(tmp_path, spec(layers), verify="full")
    ids = list(range(3 * BS))
    table = [2, 0, 3]
    assert loader.store(ids, layout, table)["written"] == 3
    dst = [torch.zeros_like(t) for t in kvs]
    dviews = [kv.gpu_attn_views(t, DIM) for t in dst]
    dlayout = kvfs.layout_from_views([k for k, _ in dviews], [v for _, v in dviews])
    loader.load(ids, dlayout, [1, 3, 0]).wait()
    for src, out in zip(kvs, dst):
        for i, (s_blk, d_blk) in enumerate(zip(table, [1, 3, 0])):
            assert torch.equal(out[d_blk], src[s_blk]), f"block {i}"
    with pytest.raises(kvfs.KvfsError, match="expected"):
        kv.gpu_attn_views(torch.zeros(4, HEADS, BS, DIM), DIM)


def test_views_of_cuda_tensors_make_a_device_layout_that_host_paths_refuse(tmp_path: Path) -> None:
    kvs = [FakeCuda(t) for t in gpu_cache(2, 4, nhd=True)]
    views = [kv.gpu_attn_views(t, DIM) for t in kvs]
    layout = kvfs.layout_from_views([k for k, _ in views], [v for _, v in views])
    assert layout.device == "cuda"
    loader = kvfs.Loader(tmp_path, spec())
    ids = list(range(2 * BS))
    with pytest.raises(kvfs.LayoutError, match="CUDA memory"):
        loader.load(ids, layout, [0, 1])
    with pytest.raises(kvfs.LayoutError, match="CUDA memory"):
        loader.store(ids, layout, [0, 1])
    host = [kv.gpu_attn_views(t, DIM) for t in gpu_cache(2, 4, nhd=True)]
    with pytest.raises(kvfs.LayoutError, match="on the host or all on a CUDA device"):
        kvfs.layout_from_views([views[0][0], host[1][0]], [views[0][1], host[1][1]])
    with pytest.raises(kvfs.LayoutError, match="device must be"):
        kvfs.KvLayout(
            [(0, 0)], [(0, 0)], dtype="bf16", num_kv_heads=1, head_dim=1, num_blocks=1,
            block_size=1, block_stride=2, k_strides=(2, 2, 2), v_strides=(2, 2, 2), device="tpu",
        )


def connector(tmp_path: Path, backend: str) -> kv.KvfsConnector:
    """A worker-side connector with only what register_kv_caches and the load/save hooks use
    (vLLM's own config objects need an engine)."""
    c = object.__new__(kv.KvfsConnector)
    c._specs = [spec()]
    c._block_size = BS
    c._chunk = BS
    c._path = str(tmp_path)
    c._verify = "header"
    c._threads = 2
    c._loaders = {}
    c._loads = []
    c._failed_blocks = set()
    c._cuda = None
    c._layout = None
    layer = SimpleNamespace(attn_backend=SimpleNamespace(get_name=lambda: backend))
    c._vllm_config = SimpleNamespace(
        cache_config=SimpleNamespace(cache_dtype="auto"),
        compilation_config=SimpleNamespace(
            static_forward_context={f"model.layers.{i}.self_attn.attn": layer for i in range(2)}
        ),
    )
    c._kv_transfer_config = SimpleNamespace(kv_connector_extra_config={})
    return c


def names() -> list[str]:
    return [f"model.layers.{i}.self_attn.attn" for i in range(2)]


@pytest.mark.skipif(not NO_CUDA, reason="checks the error of a machine without CUDA")
def test_connector_with_a_cuda_kv_cache_and_no_cuda_says_why(tmp_path: Path) -> None:
    c = connector(tmp_path, "FLASH_ATTN")
    caches = dict(zip(names(), (FakeCuda(t) for t in gpu_cache(2, 4, nhd=True))))
    with pytest.raises(kvfs.KvfsError, match="CUDA device 0.*libcuda.so.1 not found"):
        c.register_kv_caches(caches)
    c = connector(tmp_path, "TRITON_ATTN")
    with pytest.raises(kvfs.KvfsError, match="unsupported attention back end TRITON_ATTN"):
        c.register_kv_caches(caches)


class RecordingBackend:
    """Stands in for CudaBackend where no GPU exists: records what the connector asks of it
    and hands back a handle that records waits."""

    path = "staging"

    def __init__(self):
        self.calls: list[tuple] = []

    def load(self, loader, tokens, layout, block_ids, start, end):
        self.calls.append(("load", layout.device, list(block_ids), start, end))
        backend = self

        class Handle:
            def wait_layer(self, layer, stream=None):
                backend.calls.append(("wait_layer", layer, stream))

            def wait(self):
                backend.calls.append(("wait",))
                # the keys DeviceLoadHandle.wait() returns, which the connector logs
                return {"path": "staging", "chunks": 2, "tokens": 2 * BS, "bytes_needed": 0,
                        "bytes_read": 0, "direct_files": 2, "buffered_files": 0,
                        "elapsed_s": 0.0, "layer_issued_s": [0.0, 0.0]}

        return Handle()

    def store(self, loader, tokens, layout, block_ids):
        self.calls.append(("store", layout.device, list(block_ids)))
        return {"written": 1, "present": 0, "bytes_written": 0}


def test_connector_dispatches_cuda_kv_caches_to_the_cuda_backend(tmp_path: Path, monkeypatch) -> None:
    rec = RecordingBackend()
    monkeypatch.setattr(kv, "open_cuda_backend", lambda path, device, force=None: rec)
    c = connector(tmp_path, "FLASH_ATTN")
    c.register_kv_caches(dict(zip(names(), (FakeCuda(t) for t in gpu_cache(2, 4, nhd=True)))))
    assert c._cuda is rec and c._layout.device == "cuda"
    ids = list(range(2 * BS))
    meta = kv.KvfsConnectorMetadata(
        loads=[kv.LoadSpec("r1", b"", ids, [3, 1], 0, 2 * BS)],
        saves=[kv.SaveSpec("r1", b"", ids, [3, 1])],
    )
    c._get_connector_metadata = lambda: meta
    c.has_connector_metadata = lambda: True
    monkeypatch.setattr(kv.KvfsConnector, "_engine_stream", lambda self: 0xC0FFEE)
    c.start_load_kv(None)
    c.wait_for_layer_load(names()[1])
    c.wait_for_save()
    assert rec.calls == [
        ("load", "cuda", [3, 1], 0, 2 * BS),
        ("wait_layer", 1, 0xC0FFEE),
        ("wait",),
        ("store", "cuda", [3, 1]),
    ]
