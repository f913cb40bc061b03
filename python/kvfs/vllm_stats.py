"""The kvfs loader's figures in vLLM: `KvfsConnectorStats` and `KvfsPromMetrics`.

vLLM collects connector statistics per interval: each worker (and the scheduler) returns a
`KVConnectorStats` from `get_kv_connector_stats()`, vLLM sums them across workers with
`aggregate()`, logs `reduce()` and hands the data to the connector's `KVConnectorPromMetrics`,
which records it in vLLM's own Prometheus metrics (served on vLLM's `/metrics`).

What kvfs reports:

- **counters** (`COUNTERS`): this process's loader counters (`kvfs.loader_metrics()`: lookups,
  the tokens asked about and found, loads finished and failed, chunks, tokens and bytes
  loaded, stores), as the change since the previous interval. The counters are per process,
  so one tracker per process (`interval()`) hands each change out once, even when the
  scheduler and a worker share a process;
- **latencies** (`SERIES`): each finished load's time (`load_seconds`) and the time to each of
  its layers in place (`layer_ready_seconds`), observed by the worker as it waits for its
  loads, so vLLM's histograms get exact values.

In Prometheus they are `vllm:kvfs_<counter>_total` and the histograms
`vllm:kvfs_load_seconds` and `vllm:kvfs_layer_ready_seconds` (buckets: the loader's
`LATENCY_BOUNDS`), with vLLM's engine labels.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

from . import loader_metrics

COUNTERS = (
    "lookups",
    "lookup_tokens",
    "hit_tokens",
    "loads",
    "load_failures",
    "chunks_loaded",
    "tokens_loaded",
    "bytes_loaded",
    "stores",
    "chunks_stored",
    "bytes_stored",
)
SERIES = ("load_seconds", "layer_ready_seconds")

_HELP = {
    "lookups": "Prefix lookups by the kvfs loader",
    "lookup_tokens": "Prompt tokens the kvfs loader looked up",
    "hit_tokens": "Prompt tokens the kvfs loader found cached",
    "loads": "KV loads by the kvfs loader that finished",
    "load_failures": "KV loads by the kvfs loader that failed (missing or corrupt chunk, I/O)",
    "chunks_loaded": "Chunks loaded by the kvfs loader",
    "tokens_loaded": "Tokens loaded by the kvfs loader",
    "bytes_loaded": "Bytes the kvfs loader read from chunk files",
    "stores": "KV stores by the kvfs loader that succeeded",
    "chunks_stored": "Chunks written by the kvfs loader",
    "bytes_stored": "Bytes of chunks written by the kvfs loader",
    "load_seconds": "Time of each kvfs load, from its start to the last byte in place",
    "layer_ready_seconds": "Time from a kvfs load's start to each layer in place",
}


def _empty() -> dict[str, Any]:
    d: dict[str, Any] = {c: 0 for c in COUNTERS}
    d.update({s: [] for s in SERIES})
    return d


@dataclass
class KvfsConnectorStats(KVConnectorStats):
    """One interval of kvfs figures (see the module documentation); `data` holds the counter
    changes and the latency observations, plain ints and lists so that it crosses processes."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()
        for k, v in _empty().items():
            self.data.setdefault(k, v)

    def reset(self) -> None:
        self.data = _empty()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        if other.is_empty():
            return self
        assert isinstance(other, KvfsConnectorStats)
        for c in COUNTERS:
            self.data[c] += other.data[c]
        for s in SERIES:
            self.data[s] = list(self.data[s]) + list(other.data[s])
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        loads = d["load_seconds"]
        out: dict[str, int | float] = {
            "lookups": d["lookups"],
            "hit_token_rate": round(d["hit_tokens"] / d["lookup_tokens"], 4) if d["lookup_tokens"] else 0.0,
            "loads": d["loads"],
            "load_failures": d["load_failures"],
            "loaded_MB": round(d["bytes_loaded"] / 1e6, 3),
            "mean_load_ms": round(1000 * sum(loads) / len(loads), 3) if loads else 0.0,
            "stored_chunks": d["chunks_stored"],
        }
        return out

    def is_empty(self) -> bool:
        return not any(self.data[c] for c in COUNTERS) and not any(self.data[s] for s in SERIES)


class _Interval:
    """This process's tracker: the loader counters at the last hand-out, and the latencies
    observed since."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = self._counters()
        self._series: dict[str, list[float]] = {s: [] for s in SERIES}

    @staticmethod
    def _counters() -> dict[str, int]:
        m = loader_metrics()
        return {c: int(m[c]) for c in COUNTERS}

    def record_load(self, stats: dict[str, Any]) -> None:
        """A finished load's figures (`LoadHandle.wait()`)."""
        with self._lock:
            self._series["load_seconds"].append(float(stats["elapsed_s"]))
            # A device load (kvfs.CudaBackend) knows when layers were issued, not in place.
            ready = stats.get("layer_ready_s", [])
            self._series["layer_ready_seconds"].extend(float(x) for x in ready)

    def take(self) -> KvfsConnectorStats | None:
        """The figures since the previous call (None when nothing happened)."""
        with self._lock:
            now = self._counters()
            data: dict[str, Any] = {c: now[c] - self._last[c] for c in COUNTERS}
            data.update(self._series)
            self._last = now
            self._series = {s: [] for s in SERIES}
        stats = KvfsConnectorStats(data=data)
        return None if stats.is_empty() else stats


_interval: _Interval | None = None
_interval_lock = threading.Lock()


def interval() -> _Interval:
    """This process's tracker (made on first use: its counters start from that moment)."""
    global _interval
    with _interval_lock:
        if _interval is None:
            _interval = _Interval()
        return _interval


class KvfsPromMetrics(KVConnectorPromMetrics):
    """kvfs's figures as vLLM Prometheus metrics (see the module documentation)."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        bounds = list(loader_metrics()["load_seconds"]["bounds"])
        self._counters = {
            c: self._counter_cls(
                name=f"vllm:kvfs_{c}_total", documentation=_HELP[c], labelnames=self._labelnames
            )
            for c in COUNTERS
        }
        self._histograms = {
            s: self._histogram_cls(
                name=f"vllm:kvfs_{s}", documentation=_HELP[s], labelnames=self._labelnames, buckets=bounds
            )
            for s in SERIES
        }
        self._children: dict[tuple[int, str], Any] = {}

    def _child(self, engine_idx: int, name: str, metric: Any) -> Any:
        child = self._children.get((engine_idx, name))
        if child is None:
            child = metric.labels(*self.per_engine_labelvalues[engine_idx])
            self._children[(engine_idx, name)] = child
        return child

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for c, metric in self._counters.items():
            n = transfer_stats_data.get(c, 0)
            if n:
                self._child(engine_idx, c, metric).inc(n)
        for s, metric in self._histograms.items():
            values = transfer_stats_data.get(s, [])
            if values:
                child = self._child(engine_idx, s, metric)
                for v in values:
                    child.observe(v)
