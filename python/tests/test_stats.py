"""The loader's process counters from Python (`kvfs.loader_metrics()`), and how the vLLM
connector reports them: per-interval `KvfsConnectorStats` (each change handed out once,
latencies as observed), summed across workers, and recorded in vLLM-style Prometheus
metrics by `KvfsPromMetrics`."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import required

try:
    import torch
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    import kvfs
    from kvfs.vllm import KvfsConnector
    from kvfs.vllm_stats import COUNTERS, KvfsConnectorStats, interval

    _missing = ""
except ImportError as e:  # the venv of scripts/install-vllm is not the one running
    _missing = f"kvfs, torch, prometheus_client or vllm is not importable ({e}); run scripts/install-vllm"

if _missing:
    if required("vllm"):
        pytest.fail(f"KVFS_REQUIRE includes vllm: {_missing}", pytrace=False)
    pytest.skip(_missing, allow_module_level=True)

HEADS, DIM, BS, LAYERS = 2, 32, 16, 3


def rows(tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor], kvfs.KvLayout]:
    k = [torch.randn(tokens, HEADS, DIM).to(torch.bfloat16) for _ in range(LAYERS)]
    v = [torch.randn(tokens, HEADS, DIM).to(torch.bfloat16) for _ in range(LAYERS)]
    layout = kvfs.layout_from_views(
        [x.view(tokens, HEADS, 1, DIM) for x in k], [x.view(tokens, HEADS, 1, DIM) for x in v]
    )
    return k, v, layout


def test_loader_metrics_and_connector_intervals_follow_the_loader(tmp_path: Path) -> None:
    spec = kvfs.ModelSpec("kvfs/stats-test", "bf16", LAYERS, HEADS, DIM, chunk_tokens=BS)
    loader = kvfs.Loader(tmp_path, spec)
    tracker = interval()
    tracker.take()  # what earlier tests did
    before = kvfs.loader_metrics()
    ids = list(range(3 * BS))
    # The tensors stay referenced while the loader reads or writes them.
    src = rows(2 * BS)
    assert loader.store(ids[: 2 * BS], src[2], list(range(2 * BS)))["written"] == 2
    assert loader.lookup(ids) == 2 * BS
    dst = rows(2 * BS)
    stats = loader.load(ids[: 2 * BS], dst[2], list(range(2 * BS))).wait()
    tracker.record_load(stats)
    big = rows(3 * BS)
    with pytest.raises(kvfs.ChunkError):  # the third chunk is missing
        loader.load(ids, big[2], list(range(3 * BS))).wait()
    after = kvfs.loader_metrics()
    assert after["lookups"] - before["lookups"] == 1
    assert after["lookup_tokens"] - before["lookup_tokens"] == 3 * BS
    assert after["hit_tokens"] - before["hit_tokens"] == 2 * BS
    assert after["loads"] - before["loads"] == 1
    assert after["load_failures"] - before["load_failures"] == 1
    assert after["bytes_loaded"] - before["bytes_loaded"] == stats["bytes_read"]
    assert after["chunks_stored"] - before["chunks_stored"] == 2
    h = after["load_seconds"]
    assert len(h["buckets"]) == len(h["bounds"]) + 1
    assert sum(h["buckets"]) == h["count"]
    assert after["layer_ready_seconds"]["count"] - before["layer_ready_seconds"]["count"] == LAYERS

    # The connector hands the change out once, with the latencies it observed.
    # What a worker's connector returns (it reads only this process's tracker: no engine).
    got = KvfsConnector.get_kv_connector_stats(None)  # type: ignore[arg-type]
    assert isinstance(got, KvfsConnectorStats)
    assert got.data["lookups"] == 1 and got.data["hit_tokens"] == 2 * BS
    assert got.data["load_failures"] == 1
    assert got.data["load_seconds"] == [stats["elapsed_s"]]
    assert len(got.data["layer_ready_seconds"]) == LAYERS
    assert interval().take() is None


def test_stats_sum_across_workers_and_reduce() -> None:
    a = KvfsConnector.build_kv_connector_stats({c: 1 for c in COUNTERS} | {"load_seconds": [0.01]})
    b = KvfsConnector.build_kv_connector_stats(
        {"lookups": 2, "lookup_tokens": 4, "hit_tokens": 3, "load_seconds": [0.03]}
    )
    empty = KvfsConnector.build_kv_connector_stats()
    assert empty.is_empty() and not a.is_empty()
    s = a.aggregate(b).aggregate(empty)
    assert s.data["lookups"] == 3 and s.data["load_seconds"] == [0.01, 0.03]
    r = s.reduce()
    assert r["lookups"] == 3
    assert r["hit_token_rate"] == pytest.approx(4 / 5)
    assert r["mean_load_ms"] == pytest.approx(20.0)


def test_prometheus_metrics_record_what_the_stats_carry() -> None:
    reg = CollectorRegistry()
    types = {
        Counter: functools.partial(Counter, registry=reg),
        Gauge: functools.partial(Gauge, registry=reg),
        Histogram: functools.partial(Histogram, registry=reg),
    }
    config = SimpleNamespace(kv_transfer_config=None)  # all the base class reads of it
    prom = KvfsConnector.build_prom_metrics(config, types, ["engine"], {0: ["0"]})
    data = {c: 0 for c in COUNTERS} | {
        "lookups": 5,
        "hit_tokens": 64,
        "bytes_loaded": 1000,
        "load_seconds": [0.002, 0.2],
        "layer_ready_seconds": [0.001],
    }
    prom.observe(data, engine_idx=0)
    prom.observe(data, engine_idx=0)
    assert reg.get_sample_value("vllm:kvfs_lookups_total", {"engine": "0"}) == 10
    assert reg.get_sample_value("vllm:kvfs_hit_tokens_total", {"engine": "0"}) == 128
    assert reg.get_sample_value("vllm:kvfs_bytes_loaded_total", {"engine": "0"}) == 2000
    assert reg.get_sample_value("vllm:kvfs_load_seconds_count", {"engine": "0"}) == 4
    assert reg.get_sample_value("vllm:kvfs_load_seconds_sum", {"engine": "0"}) == pytest.approx(0.404)
    assert reg.get_sample_value("vllm:kvfs_load_seconds_bucket", {"engine": "0", "le": "0.0025"}) == 2
    assert reg.get_sample_value("vllm:kvfs_layer_ready_seconds_count", {"engine": "0"}) == 2
