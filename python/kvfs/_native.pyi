"""Type stubs of the Rust extension `kvfs._native` (python/src/lib.rs)."""

from os import PathLike
from typing import Literal, TypedDict

class KvfsError(Exception): ...
class SpecError(KvfsError): ...
class LayoutError(KvfsError): ...
class InvalidRequest(KvfsError): ...
class KvfsIOError(KvfsError): ...
class StoreError(KvfsError): ...
class CudaUnavailable(KvfsError): ...
class DeviceError(KvfsError): ...

class ChunkError(KvfsError):
    chunk: int
    path: str
    valid_tokens: int
    valid_blocks: list[int]

class LoadStats(TypedDict):
    chunks: int
    tokens: int
    bytes_needed: int
    bytes_read: int
    direct_files: int
    buffered_files: int
    backing_files: int
    elapsed_s: float
    layer_ready_s: list[float]

class StoreStats(TypedDict):
    written: int
    present: int
    bytes_written: int

class LatencyHistogram(TypedDict):
    bounds: list[float]
    buckets: list[int]
    count: int
    sum_seconds: float

class LoaderMetrics(TypedDict):
    lookups: int
    lookup_tokens: int
    hit_tokens: int
    loads: int
    load_failures: int
    chunks_loaded: int
    tokens_loaded: int
    bytes_loaded: int
    load_seconds: LatencyHistogram
    layer_ready_seconds: LatencyHistogram
    stores: int
    chunks_stored: int
    bytes_stored: int

def loader_metrics() -> LoaderMetrics: ...

class ModelSpec:
    def __init__(
        self,
        model: str,
        dtype: str,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        revision: str = "",
        tp_size: int = 1,
        tp_rank: int = 0,
        rope_theta: float = 10000.0,
        rope_scaling: str = "",
        chunk_tokens: int = 256,
        group_tokens: int = 16,
        mla: bool = False,
        codec: str = "raw",
    ) -> None:
        """`codec`: how chunks are stored, "raw", "lossless" (same cache, fewer bytes), or
        a lossy "int8", "fp8" (e4m3), "kivi4", "kivi2", each a namespace of its own
        (docs/FORMAT.md, "Codecs"). An unknown name raises SpecError."""
    @staticmethod
    def preset(name: str) -> ModelSpec: ...
    @property
    def model(self) -> str: ...
    @property
    def revision(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def tp_size(self) -> int: ...
    @property
    def tp_rank(self) -> int: ...
    @property
    def chunk_tokens(self) -> int: ...
    @property
    def namespace_dir(self) -> str: ...
    @property
    def namespace_id(self) -> str: ...

class KvLayout:
    def __init__(
        self,
        k: list[tuple[int, int]],
        v: list[tuple[int, int]],
        *,
        dtype: str,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        block_stride: int,
        k_strides: tuple[int, int, int],
        v_strides: tuple[int, int, int],
        device: Literal["cpu", "cuda"] = "cpu",
    ) -> None: ...
    @property
    def device(self) -> Literal["cpu", "cuda"]: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    def slot_addr(self, layer: int, plane: int, slot: int) -> int: ...

class LoadHandle:
    @property
    def num_layers(self) -> int: ...
    def wait_layer(self, layer: int) -> None: ...
    def done(self) -> bool: ...
    def wait(self) -> LoadStats: ...
    def cancel(self) -> None: ...

class Loader:
    def __init__(
        self,
        path: str | PathLike[str],
        spec: ModelSpec,
        salt: bytes = b"",
        *,
        threads: int = 4,
        io: Literal["direct", "buffered"] = "direct",
        verify: Literal["header", "full"] = "header",
    ) -> None: ...
    @property
    def namespace_dir(self) -> str: ...
    @property
    def chunk_tokens(self) -> int: ...
    @property
    def spec(self) -> ModelSpec: ...
    def lookup(self, tokens: list[int]) -> int: ...
    def chunk_paths(self, tokens: list[int]) -> list[str]: ...
    def load(
        self,
        tokens: list[int],
        layout: KvLayout,
        block_ids: list[int],
        start: int = 0,
        end: int | None = None,
        verify: Literal["header", "full"] | None = None,
    ) -> LoadHandle: ...
    def store(
        self,
        tokens: list[int],
        layout: KvLayout,
        block_ids: list[int],
        importance: list[list[list[float]]] | None = None,
        observed_queries: int = 32,
        *,
        tail: bool = False,
    ) -> StoreStats: ...
    def importance_selection(self, tokens: list[int], upto: int, share: float) -> list[list[int]]: ...
    def snapshot(
        self, tokens: list[int], layout: KvLayout, block_ids: list[int], *, tail: bool = False
    ) -> StoreSnapshot: ...
    def store_snapshot(self, snapshot: StoreSnapshot) -> StoreStats: ...

class StoreSnapshot:
    @property
    def bytes(self) -> int: ...
    @property
    def positions(self) -> tuple[int, int]: ...

class DeviceLoadStats(TypedDict):
    path: str
    chunks: int
    tokens: int
    bytes_needed: int
    bytes_read: int
    direct_files: int
    buffered_files: int
    elapsed_s: float
    layer_issued_s: list[float]

class DeviceLoadHandle:
    @property
    def num_layers(self) -> int: ...
    @property
    def direct(self) -> bool: ...
    def wait_layer(self, layer: int, stream: int | None = None) -> None: ...
    def layer_event(self, layer: int) -> int | None: ...
    def done(self) -> bool: ...
    def wait(self) -> DeviceLoadStats | LoadStats: ...
    def cancel(self) -> None: ...

class CudaBackend:
    def __init__(
        self,
        *,
        force: Literal["gds", "compat", "staging", "host"] | None = None,
        device: int = 0,
        probe_dir: str | PathLike[str] | None = None,
    ) -> None: ...
    @property
    def path(self) -> Literal["gds", "compat", "staging"]: ...
    @property
    def probe(self) -> str: ...
    def load(
        self,
        loader: Loader,
        tokens: list[int],
        layout: KvLayout,
        block_ids: list[int],
        start: int = 0,
        end: int | None = None,
        verify: Literal["header", "full"] | None = None,
    ) -> DeviceLoadHandle: ...
    def store(
        self, loader: Loader, tokens: list[int], layout: KvLayout, block_ids: list[int]
    ) -> StoreStats: ...

def cuda_probe(probe_dir: str | PathLike[str] | None = None) -> str: ...
