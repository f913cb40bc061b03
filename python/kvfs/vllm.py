"""kvfs as a vLLM KV connector: `KvfsConnector`.

Load it with::

    --kv-transfer-config '{"kv_connector": "KvfsConnector",
        "kv_connector_module_path": "kvfs.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"kvfs_path": "/kvfs"}}'

`kvfs_path` is a kvfs mount or a plain cache directory. Design (docs/VLLM.md has the details):

- **Chunks are vLLM blocks, and a prompt is reused up to its last token.** A kvfs chunk holds
  `chunk_tokens` tokens; the connector makes it vLLM's block size (`kvfs_chunk_tokens` in the
  extra config may pick a multiple of it). When a prompt's prefill is complete its trailing
  partial chunk is stored too (keyed by its parent and its own tokens), so a repeat of the
  prompt reuses `len(prompt) - 1` tokens (vLLM computes the last one): 4,095 of 4,096, 8,190
  of 8,191. A load may end inside a chunk and a block; vLLM allocates the partial block.
- **Namespace.** The `ModelSpec` names the model directory, a digest of its weights and config
  files (or `kvfs_revision`), the KV dtype, the layer count, the KV heads of this rank, the
  head dim, RoPE, and the tensor-parallel size and rank: two models never share chunks.
  `cache_salt` of a request isolates its tenant (the loader's salt).
- **Scheduler side.** `get_num_new_matched_tokens` looks the prompt up (on a mount a lookup
  fetches from S3: the full chunks, then one probe for the partial one) and offers what is
  cached beyond vLLM's own prefix cache, up to the last prompt token;
  `update_state_after_alloc` records the load; `build_connector_meta` hands the worker each
  load (tokens, block ids, token range) and each save: the prompt chunks that this step
  completes (prefill, chunked or not), with their block ids, and the partial last chunk in
  the step that completes the prompt.
- **Worker side.** `register_kv_caches` derives a `KvLayout` from the registered tensors and
  the attention back end (vLLM's CPU back end: per block and head, the block's K transposed,
  `[head_dim, block_size]`, then its V as rows; FLASH_ATTN and FLASHINFER on a GPU: per block
  and head `[block_size, 2 * head_dim]`, K then V in the last dim, in the tensor's own memory
  order); `start_load_kv` starts the loads (reads run on kvfs threads,
  layer 0 of every chunk first); `wait_for_layer_load` waits for one layer; `wait_for_save`
  copies the rows of the chunks completed by this step out of the blocks once every layer has
  computed them (`Loader.snapshot`), and a writer thread encodes, hashes and writes them
  (`Loader.store_snapshot`), so the step does not wait on the disk (`kvfs_store_async`).
- **GPU KV caches** (`tensor.is_cuda`) load through `kvfs.CudaBackend` (GDS, else pinned
  staging; `kvfs_gpu_path` in the extra config forces one): with `kvfs_verify` `header` the
  chunks go straight to device blocks and `wait_for_layer_load` makes vLLM's current stream
  wait for the layer on the GPU; `full` (digests checked on host bytes) stages through the
  loader with one host-to-device copy per piece. A machine whose KV cache is on a GPU but
  that has no usable CUDA path fails at start-up, saying why.
- **Failures never reach the engine.** A missing, corrupt or unreadable chunk ends its load;
  the blocks it would have filled are reported by `get_block_ids_with_load_errors`, and with
  `kv_load_failure_policy` `recompute` vLLM recomputes them. Store errors are logged: a failed
  save is a future miss.
- **Metrics.** `get_kv_connector_stats` reports the loader's counters and load latencies for
  each interval through vLLM's connector stats, which vLLM logs and exports on its own
  `/metrics` (`build_prom_metrics`; see `kvfs.vllm_stats`).
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger
from vllm.v1.metrics.cache_hit_source import CacheHitSource
from vllm.model_executor.models.utils import extract_layer_index

from . import (
    ChunkError,
    CudaBackend,
    KvfsError,
    Loader,
    ModelSpec,
    StoreSnapshot,
    layout_from_views,
)
from .vllm_stats import KvfsConnectorStats, KvfsPromMetrics, interval

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

# Under the "vllm" logger, whose handlers vLLM configures (a logger named after this module
# would print nothing).
logger = init_logger("vllm.kvfs")

# Files whose bytes make up a model's weights and architecture.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CONFIG_FILES = ("config.json",)

_digest_lock = threading.Lock()
_digest_cache: dict[str, str] = {}


def weights_digest(model_dir: str) -> str:
    """sha256 over the names and bytes of a model directory's weight and config files."""
    with _digest_lock:
        if model_dir in _digest_cache:
            return _digest_cache[model_dir]
        root = Path(model_dir)
        files = sorted(
            p
            for p in root.iterdir()
            if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name in _CONFIG_FILES)
        )
        if not files:
            raise KvfsError(
                f"no weight files in {model_dir}: set kvfs_revision in "
                "kv_connector_extra_config to name the weights"
            )
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode() + b"\0")
            with p.open("rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
        digest = "sha256:" + h.hexdigest()
        _digest_cache[model_dir] = digest
        return digest


_TORCH_DTYPES = {
    "torch.float16": "f16",
    "torch.bfloat16": "bf16",
    "torch.float32": "f32",
}
_FP8 = {"fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}


def spec_for(vllm_config: VllmConfig, tp_rank: int, chunk_tokens: int) -> ModelSpec:
    """The kvfs `ModelSpec` of this engine's KV cache on tensor-parallel rank `tp_rank`."""
    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype in ("auto", None):
        dtype = _TORCH_DTYPES.get(str(mc.dtype))
        if dtype is None:
            raise KvfsError(f"unsupported model dtype {mc.dtype}")
    else:
        dtype = _FP8.get(str(cache_dtype))
        if dtype is None:
            raise KvfsError(f"unsupported KV cache dtype {cache_dtype}")
    revision = extra.get("kvfs_revision") or mc.revision
    if not revision:
        revision = weights_digest(mc.model) if os.path.isdir(mc.model) else ""
    if not revision:
        raise KvfsError(
            f"cannot name the weights of {mc.model}: set kvfs_revision in "
            "kv_connector_extra_config"
        )
    hf = mc.hf_text_config
    rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    theta = float(rope.pop("rope_theta", getattr(hf, "rope_theta", 10000.0)) or 10000.0)
    return ModelSpec(
        os.path.basename(os.path.normpath(mc.model)),
        dtype,
        mc.get_num_layers(pc),
        mc.get_num_kv_heads(pc),
        mc.get_head_size(),
        revision=str(revision),
        tp_size=pc.tensor_parallel_size,
        tp_rank=tp_rank,
        rope_theta=theta,
        rope_scaling=json.dumps(rope, sort_keys=True, default=str) if rope else "",
        chunk_tokens=chunk_tokens,
        group_tokens=math.gcd(16, chunk_tokens),
        codec=str(extra.get("kvfs_codec", "raw")),
    )


# The CPU attention kernels whose cache layout python/tests/test_loader.py checks against
# vLLM's own `cpu_attn_reshape_and_cache` (AVX2/AVX-512 `vec`, and `vec16`); AMX, NEON and the
# others may pack K differently.
_VERIFIED_ISAS = frozenset({"vec", "vec16"})


def _cpu_attn_isa(dtype: Any, block_size: int, head_dim: int, cache_dtype: str) -> str:
    """The ISA vLLM's CPU attention back end picks for this cache."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_dim, cache_dtype)


def cpu_attn_views(kv: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views, each `[blocks, heads, block_size, head_dim]`, of one layer of vLLM's CPU
    attention cache `[blocks, heads, block_size, 2 * head_dim]`. Per block and head, the
    kernel (`cpu_attn_reshape_and_cache`) writes the block's K transposed, `[head_dim,
    block_size]`, then its V as rows, `[block_size, head_dim]`: the K view is a transpose."""
    nb, heads, bs, _ = kv.shape
    halves = kv.view(nb, heads, 2, bs * head_dim)
    k = halves[:, :, 0].view(nb, heads, head_dim, bs).transpose(2, 3)
    v = halves[:, :, 1].view(nb, heads, bs, head_dim)
    return k, v


# GPU attention back ends whose cache is `[num_blocks, num_kv_heads, block_size, 2 * head_dim]`
# (in any memory order), K then V in the last dim: FlashAttention's and FlashInfer's layout in
# the vLLM this connector targets.
_GPU_BACKENDS = frozenset({"FLASH_ATTN", "FLASHINFER"})


def on_cuda(kv: Any) -> bool:
    """Whether a KV tensor lives in CUDA memory (`tensor.is_cuda`)."""
    return bool(getattr(kv, "is_cuda", False))


def gpu_attn_views(kv: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V views, each `[blocks, heads, block_size, head_dim]`, of one layer of vLLM's GPU
    attention cache `[blocks, heads, block_size, 2 * head_dim]` (FLASH_ATTN, FLASHINFER): the
    two halves of the last dim, in whatever memory order the tensor has."""
    if kv.dim() != 4 or kv.shape[-1] != 2 * head_dim:
        raise KvfsError(
            f"kvfs: GPU KV cache of shape {tuple(kv.shape)}: expected "
            f"[blocks, heads, block_size, {2 * head_dim}]"
        )
    return kv[..., :head_dim], kv[..., head_dim:]


def open_cuda_backend(
    probe_dir: str, device: int, force: str | None = None
) -> CudaBackend:
    """The kvfs CUDA back end for a KV cache on CUDA device `device`; a `KvfsError` that says
    why when this machine cannot load into GPU memory."""
    try:
        return CudaBackend(force=force, device=device, probe_dir=probe_dir)
    except KvfsError as e:
        raise KvfsError(
            f"kvfs: vLLM's KV cache is on CUDA device {device}, but kvfs cannot load into "
            f"it: {e}"
        ) from e


@dataclass
class LoadSpec:
    """Load token positions `start..end` of `tokens` into `block_ids` (position p in block
    `block_ids[p // block_size]`)."""

    req_id: str
    salt: bytes
    tokens: list[int]
    block_ids: list[int]
    start: int
    end: int


@dataclass
class SaveSpec:
    """Store the full chunks of `tokens` from `block_ids`, and with `tail` (the whole prompt,
    computed) its trailing partial chunk too."""

    req_id: str
    salt: bytes
    tokens: list[int]
    block_ids: list[int]
    tail: bool = False


@dataclass
class KvfsConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _ReqState:
    """What the scheduler side tracks of a running request."""

    prompt: list[int]
    salt: bytes
    block_ids: list[int]
    saved_end: int = 0
    # the trailing partial chunk is in kvfs (stored, or loaded from there)
    tail_saved: bool = False


class ChunkWriter:
    """Stores snapshots (`Loader.store_snapshot`, the GIL released) on a thread of its own,
    in the order they were queued, so a step hands its chunks over and goes on. The thread runs
    while snapshots are queued and ends when none is left; it is not a daemon, so a process
    that exits normally stores what it queued first. A failed store is logged: the chunk is a
    future miss. (A process killed before its snapshots are stored loses them: misses, never
    wrong chunks.)

    The backlog is bounded: `put` waits while the snapshots queued or being written hold more
    than `max_bytes` (`kvfs_store_queue_mb`), so a disk slower than the engine slows the steps
    that store instead of growing memory without bound, and what an engine killed at shutdown
    can lose stays small. A snapshot larger than the bound on its own waits for an empty queue.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max(0, max_bytes)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._pending: collections.deque[tuple[Loader, StoreSnapshot, str]] = collections.deque()
        # bytes of the snapshots queued and the one being written
        self._backlog = 0
        self._thread: threading.Thread | None = None

    @property
    def backlog_bytes(self) -> int:
        with self._lock:
            return self._backlog

    def put(self, loader: Loader, snap: StoreSnapshot, req_id: str) -> None:
        size = snap.bytes
        with self._lock:
            while self._backlog > 0 and self._backlog + size > self._max_bytes:
                self._changed.wait()
            self._pending.append((loader, snap, req_id))
            self._backlog += size
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvfs-writer")
                self._thread.start()

    def drain(self) -> None:
        """Returns once every snapshot queued so far is stored (or failed)."""
        with self._lock:
            while self._thread is not None:
                self._changed.wait()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._thread = None
                    self._changed.notify_all()
                    return
                loader, snap, req_id = self._pending.popleft()
            try:
                stats = loader.store_snapshot(snap)
                logger.debug("kvfs: request %s stored %s", req_id, stats)
            except KvfsError as e:
                logger.warning("kvfs: store for request %s failed: %s", req_id, e)
            finally:
                with self._lock:
                    self._backlog -= snap.bytes
                    self._changed.notify_all()


def _salt(request: Any) -> bytes:
    salt = getattr(request, "cache_salt", None)
    return salt.encode() if isinstance(salt, str) else (salt or b"")


class KvfsConnector(KVConnectorBase_V1):
    """vLLM KV connector over kvfs (see the module documentation)."""

    # kvfs serves hits from local disk (a mount may have fetched them from S3 first)
    _cache_hit_source = CacheHitSource.DISK

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        path = extra.get("kvfs_path")
        if not path:
            raise KvfsError("kv_connector_extra_config needs kvfs_path (a kvfs mount or directory)")
        self._path = str(path)
        self._block_size = vllm_config.cache_config.block_size
        chunk = int(extra.get("kvfs_chunk_tokens", self._block_size))
        if chunk <= 0 or chunk % self._block_size:
            raise KvfsError(
                f"kvfs_chunk_tokens {chunk} must be a positive multiple of the block size "
                f"{self._block_size}"
            )
        self._chunk = chunk
        self._threads = int(extra.get("kvfs_threads", 4))
        # "full" checks every layer's digest on load (a flipped payload bit is a recompute,
        # not a wrong token); "header" only checks headers.
        self._verify = str(extra.get("kvfs_verify", "full"))
        # Stores: the step copies the rows out and a writer thread stores them (True), or the
        # step stores them itself (False).
        self._store_async = str(extra.get("kvfs_store_async", "true")).lower() not in (
            "0", "false", "no", "off"
        )
        # Bound of the writer's backlog, in MiB (see ChunkWriter).
        self._store_queue_bytes = int(float(extra.get("kvfs_store_queue_mb", 256)) * (1 << 20))
        self._tp_size = vllm_config.parallel_config.tensor_parallel_size
        if role == KVConnectorRole.SCHEDULER:
            # The scheduler serves every rank: a hit needs each rank's chunks.
            self._ranks = list(range(self._tp_size))
            if self._kv_transfer_config.kv_load_failure_policy != "recompute":
                logger.warning(
                    "kvfs: kv_load_failure_policy is %r: a chunk that fails to load fails its "
                    "request; set it to 'recompute' to recompute such blocks instead",
                    self._kv_transfer_config.kv_load_failure_policy,
                )
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._ranks = [get_tensor_model_parallel_rank()]
        self._specs = [spec_for(vllm_config, r, chunk) for r in self._ranks]
        self._loaders: dict[bytes, list[Loader]] = {}
        self._open(b"")  # fail at start-up, not at the first request, on a bad path
        logger.info(
            "kvfs connector (%s) on %s: namespace %s, %d-token chunks",
            role.name,
            self._path,
            self._specs[0].namespace_dir,
            chunk,
        )

        # scheduler side
        self._hits: dict[str, tuple[int, int]] = {}
        self._pending_loads: dict[str, tuple[int, int]] = {}
        self._reqs: dict[str, _ReqState] = {}
        self._salts: dict[str, bytes] = {}
        # worker side
        self._layout = None
        self._cuda: CudaBackend | None = None
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._layer_index: dict[str, int] = {}
        self._loads: list[tuple[LoadSpec, Any]] = []
        self._failed_blocks: set[int] = set()
        self._writer = ChunkWriter(self._store_queue_bytes)
        # this step's loads: when start_load_kv began, and seconds the forward spent blocked
        # in wait_for_layer_load (logged at debug level by wait_for_save)
        self._load_started = 0.0
        self._load_waited = 0.0
        interval()  # the figures this process reports start here

    def _open(self, salt: bytes) -> list[Loader]:
        loaders = self._loaders.get(salt)
        if loaders is None:
            loaders = [
                Loader(self._path, s, salt, threads=self._threads, verify=self._verify)
                for s in self._specs
            ]
            self._loaders[salt] = loaders
        return loaders

    # ---------------------------------------------------------------- scheduler side

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        prompt = list(request.prompt_token_ids or [])
        # vLLM computes at least the last prompt token; everything before it may be loaded,
        # up to inside a block (vLLM allocates the partial block for the external tokens).
        usable = len(prompt) - 1
        if usable <= num_computed_tokens:
            return 0, False
        t = time.monotonic()
        try:
            loaders = self._open(_salt(request))
            # whole chunks, then the prompt's partial last chunk if it was stored
            hit = min(loader.lookup(prompt) for loader in loaders)
        except KvfsError as e:
            logger.warning("kvfs: lookup failed, computing the prompt: %s", e)
            return 0, False
        hit = min(hit, usable)
        if hit <= num_computed_tokens:
            return 0, False
        self._hits[request.request_id] = (num_computed_tokens, hit)
        logger.debug(
            "kvfs: request %s hit %d of %d tokens (lookup %.3f s)",
            request.request_id,
            hit,
            len(prompt),
            time.monotonic() - t,
        )
        return hit - num_computed_tokens, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ):
        hit = self._hits.pop(request.request_id, None)
        if num_external_tokens > 0 and hit is not None:
            start, _ = hit
            self._pending_loads[request.request_id] = (start, start + num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KvfsConnectorMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            prompt = list(new.prompt_token_ids or [])
            # `cache_salt` is not part of NewRequestData: on_new_request noted it.
            salt = self._salts.get(new.req_id, b"")
            st = _ReqState(prompt=prompt, salt=salt, block_ids=list(new.block_ids[0]))
            self._reqs[new.req_id] = st
            self._add_load(meta, new.req_id, st)
            self._add_save(meta, new.req_id, st, new.num_computed_tokens + scheduled.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                # a request resumed from preemption gets its whole block list
                st.block_ids = list(new_ids[0]) if new_ids is not None else []
                st.saved_end = 0
                self._add_load(meta, req_id, st)
            elif new_ids is not None:
                st.block_ids.extend(new_ids[0])
            self._add_save(
                meta, req_id, st, cached.num_computed_tokens[i] + scheduled.get(req_id, 0)
            )
        # loads of requests that were not scheduled after all are dropped
        self._pending_loads.clear()
        return meta

    def on_new_request(self, request: Request) -> None:
        salt = _salt(request)
        if salt:
            self._salts[request.request_id] = salt

    def _add_load(self, meta: KvfsConnectorMetadata, req_id: str, st: _ReqState) -> None:
        load = self._pending_loads.pop(req_id, None)
        if load is None:
            return
        start, end = load
        # the chunks the range touches: past the prompt's last full chunk, that is the
        # partial chunk of the whole prompt (its key covers every tail token)
        full = math.ceil(end / self._chunk) * self._chunk
        nblocks = math.ceil(end / self._block_size)
        meta.loads.append(
            LoadSpec(req_id, st.salt, st.prompt[:full], st.block_ids[:nblocks], start, end)
        )
        # the loaded chunks are in kvfs already
        st.saved_end = max(st.saved_end, min(full, len(st.prompt)) // self._chunk * self._chunk)
        if full > len(st.prompt):
            st.tail_saved = True

    def _add_save(self, meta: KvfsConnectorMetadata, req_id: str, st: _ReqState, done: int) -> None:
        n = len(st.prompt)
        complete = min(done, n) // self._chunk * self._chunk
        # the step that computes the last prompt token completes the partial last chunk
        tail = done >= n and n % self._chunk != 0 and not st.tail_saved
        if complete <= st.saved_end and not tail:
            return
        end = n if tail else complete
        nblocks = math.ceil(end / self._block_size)
        if len(st.block_ids) < nblocks:
            return
        meta.saves.append(
            SaveSpec(req_id, st.salt, st.prompt[:end], st.block_ids[:nblocks], tail=tail)
        )
        st.saved_end = max(st.saved_end, complete)
        st.tail_saved = st.tail_saved or tail

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Saves happen as prefill completes chunks (wait_for_save of that step): nothing is
        # left to save, and the blocks can be freed at once.
        self._reqs.pop(request.request_id, None)
        self._hits.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        self._salts.pop(request.request_id, None)
        return False, None

    # ---------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        names = sorted(kv_caches, key=extract_layer_index)
        spec = self._specs[0]
        if len(names) != spec.num_layers:
            raise KvfsError(
                f"vLLM registered {len(names)} KV cache layers, the model has {spec.num_layers}"
            )
        ctx = self._vllm_config.compilation_config.static_forward_context
        first = kv_caches[names[0]]
        cache_dtype = self._vllm_config.cache_config.cache_dtype
        if cache_dtype not in ("auto", None):
            raise KvfsError(f"kvfs: the layout of a {cache_dtype} KV cache is not verified")
        cuda = on_cuda(first)
        if not cuda:
            isa = _cpu_attn_isa(first.dtype, self._block_size, spec.head_dim,
                                self._vllm_config.cache_config.cache_dtype)
            if isa not in _VERIFIED_ISAS:
                raise KvfsError(
                    f"kvfs: vLLM's CPU attention uses ISA {isa!r} here, whose KV block layout "
                    f"kvfs has not verified (verified: {', '.join(sorted(_VERIFIED_ISAS))})"
                )
        backends = _GPU_BACKENDS if cuda else frozenset({"CPU_ATTN"})
        ks, vs = [], []
        for name in names:
            kv = kv_caches[name]
            if kv.device != first.device:
                raise KvfsError(
                    f"kvfs: KV cache of {name} is on {kv.device}, layer {names[0]}'s on "
                    f"{first.device}: all layers must be in host memory or all on one GPU"
                )
            layer = ctx.get(name)
            backend = layer.attn_backend.get_name() if layer is not None else "?"
            if backend not in backends:
                raise KvfsError(f"kvfs: unsupported attention back end {backend} for {name}")
            nb, heads, bs, two_d = kv.shape
            if bs != self._block_size or two_d != 2 * spec.head_dim or heads != spec.num_kv_heads:
                raise KvfsError(
                    f"kvfs: KV cache of {name} has shape {tuple(kv.shape)}, expected "
                    f"[blocks, {spec.num_kv_heads}, {self._block_size}, {2 * spec.head_dim}]"
                )
            k, v = gpu_attn_views(kv, spec.head_dim) if cuda else cpu_attn_views(kv, spec.head_dim)
            ks.append(k)
            vs.append(v)
        if cuda:
            extra = self._kv_transfer_config.kv_connector_extra_config or {}
            self._cuda = open_cuda_backend(
                self._path, first.device.index or 0, extra.get("kvfs_gpu_path")
            )
            logger.info("kvfs: CUDA back end, path %s (kvfs_verify=%s%s)", self._cuda.path,
                        self._verify, ": loads staged through host memory"
                        if self._verify == "full" else "")
        self._layout = layout_from_views(ks, vs)
        self._kv_caches = kv_caches  # keep the memory alive as long as the layout
        self._layer_index = {name: i for i, name in enumerate(names)}
        logger.info(
            "kvfs: %d layers, %d blocks of %d tokens (%s attention layout)",
            len(names),
            self._layout.num_blocks,
            self._layout.block_size,
            "GPU" if cuda else "CPU",
        )

    def _blocks_of(self, load: LoadSpec, first_token: int) -> list[int]:
        """Block ids of `load` from the one holding `first_token` to the load's end."""
        bs = self._block_size
        return load.block_ids[first_token // bs : math.ceil(load.end / bs)]

    def _fail(self, load: LoadSpec, valid_blocks: list[int], err: Exception) -> None:
        bad = [b for b in self._blocks_of(load, load.start) if b not in set(valid_blocks)]
        self._failed_blocks.update(bad)
        logger.warning(
            "kvfs: load of request %s failed (%s); %d blocks will be recomputed",
            load.req_id,
            err,
            len(bad),
        )

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvfsConnectorMetadata)
        if self._layout is None:
            return
        self._load_started = time.monotonic()
        self._load_waited = 0.0
        for load in meta.loads:
            try:
                loader = self._open(load.salt)[0]
                if self._cuda is not None:
                    # The device load reads full chunks only: the blocks of a partial last
                    # chunk are recomputed (reported as failed).
                    end = min(load.end, len(load.tokens) // self._chunk * self._chunk)
                    if end < load.end:
                        bs = self._block_size
                        self._failed_blocks.update(
                            load.block_ids[end // bs : math.ceil(load.end / bs)]
                        )
                    if end <= load.start:
                        continue
                    handle = self._cuda.load(
                        loader, load.tokens, self._layout, load.block_ids, load.start, end
                    )
                else:
                    handle = loader.load(
                        load.tokens, self._layout, load.block_ids, load.start, load.end
                    )
            except KvfsError as e:
                self._fail(load, [], e)
                continue
            self._loads.append((load, handle))

    def wait_for_layer_load(self, layer_name: str) -> None:
        idx = self._layer_index.get(layer_name)
        if idx is None or not self._loads:
            return
        t = time.monotonic()
        pending = []
        stream = self._engine_stream()
        for load, handle in self._loads:
            try:
                if stream is None:
                    handle.wait_layer(idx)
                else:
                    # vLLM's stream waits on the GPU for this layer's copies; the host goes on
                    handle.wait_layer(idx, stream)
            except ChunkError as e:
                self._fail(load, e.valid_blocks, e)
                continue
            except KvfsError as e:
                self._fail(load, [], e)
                continue
            pending.append((load, handle))
        self._loads = pending
        self._load_waited += time.monotonic() - t

    def _engine_stream(self) -> int | None:
        """vLLM's current CUDA stream (a `CUstream` as an int), or None on the host path."""
        if self._cuda is None:
            return None
        import torch

        return torch.cuda.current_stream().cuda_stream

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        # Chunks are stored whole in wait_for_save, once every layer has computed them.
        return

    def wait_for_save(self):
        # Finish this step's loads first (a layer may have been skipped by the forward).
        for load, handle in self._loads:
            try:
                stats = handle.wait()
                interval().record_load(stats)
                logger.debug(
                    "kvfs: request %s loaded %d tokens (%d chunks, %d bytes) in %.3f s; the "
                    "forward waited %.3f s for layers; start_load_kv to now %.3f s",
                    load.req_id,
                    stats["tokens"],
                    stats["chunks"],
                    stats["bytes_needed"],
                    stats["elapsed_s"],
                    self._load_waited,
                    time.monotonic() - self._load_started,
                )
            except ChunkError as e:
                self._fail(load, e.valid_blocks, e)
            except KvfsError as e:
                self._fail(load, [], e)
        self._loads = []
        if not self.has_connector_metadata() or self._layout is None:
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvfsConnectorMetadata)
        for save in meta.saves:
            try:
                loader = self._open(save.salt)[0]
                if self._cuda is not None:
                    # the device store keeps to full chunks (no partial last chunk yet)
                    stats = self._cuda.store(loader, save.tokens, self._layout, save.block_ids)
                elif self._store_async:
                    # The rows leave the blocks now (vLLM may free them after this step); the
                    # writer encodes, hashes and writes them meanwhile.
                    snap = loader.snapshot(
                        save.tokens, self._layout, save.block_ids, tail=save.tail
                    )
                    if snap.bytes:
                        self._writer.put(loader, snap, save.req_id)
                    continue
                else:
                    stats = loader.store(
                        save.tokens, self._layout, save.block_ids, tail=save.tail
                    )
                logger.debug("kvfs: request %s stored %s", save.req_id, stats)
            except KvfsError as e:
                logger.warning("kvfs: store for request %s failed: %s", save.req_id, e)

    def shutdown(self) -> None:
        # Chunks handed to the writer are stored before the worker goes.
        self._writer.drain()

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    # ---------------------------------------------------------------- metrics

    def get_kv_connector_stats(self) -> KvfsConnectorStats | None:
        return interval().take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvfsConnectorStats:
        return KvfsConnectorStats(data=data or {})

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[Any, Any],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KvfsPromMetrics:
        return KvfsPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
