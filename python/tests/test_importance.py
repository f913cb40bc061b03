"""Importance from Python (issue 14): chunks stored with their per-group attention mass, and
`Loader.importance_selection` ranking the stored scores into the groups a pruned load keeps,
from the headers alone; bad input raises typed exceptions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import required

try:
    import torch

    import kvfs

    _missing = ""
except ImportError as e:  # the venv of scripts/install-vllm is not the one running
    _missing = f"kvfs or torch is not importable ({e}); run scripts/install-vllm"

if _missing:
    if required("vllm"):
        pytest.fail(f"KVFS_REQUIRE includes vllm: {_missing}", pytrace=False)
    pytest.skip(_missing, allow_module_level=True)

HEADS, DIM, CHUNK, LAYERS = 3, 64, 32, 2  # 16-token groups: 2 per chunk


def rows(tokens: int) -> tuple[kvfs.KvLayout, list[torch.Tensor]]:
    """Per layer K and V rows [tokens, heads, dim] (block size 1), random."""
    torch.manual_seed(1)
    ts = [torch.randn(tokens, HEADS, DIM) for _ in range(2 * LAYERS)]
    views = [t.view(tokens, HEADS, 1, DIM) for t in ts]
    return kvfs.layout_from_views(views[:LAYERS], views[LAYERS:]), ts


def test_selection_ranks_the_stored_importance(tmp_path: Path) -> None:
    spec = kvfs.ModelSpec("kvfs/python-test", "f32", LAYERS, HEADS, DIM, revision="t1", chunk_tokens=CHUNK)
    loader = kvfs.Loader(tmp_path, spec)
    ids = list(range(500, 500 + 4 * CHUNK))
    layout, _ = rows(len(ids))
    # per chunk, per layer, per group; each layer sums to 1 over the prompt's 8 groups
    layer0 = [0.30, 0.02, 0.05, 0.20, 0.03, 0.10, 0.25, 0.05]
    layer1 = [0.10, 0.10, 0.40, 0.05, 0.05, 0.05, 0.05, 0.20]
    imp = [[layer0[2 * c : 2 * c + 2], layer1[2 * c : 2 * c + 2]] for c in range(4)]
    st = loader.store(ids, layout, list(range(len(ids))), importance=imp)
    assert st["written"] == 4
    # 25% of 8 groups = 2 per layer: the two highest, ascending
    assert loader.importance_selection(ids, len(ids), 0.25) == [[0, 6], [2, 7]]
    # 50% of the first two chunks' 4 groups
    assert loader.importance_selection(ids, 2 * CHUNK, 0.5) == [[0, 3], [0, 2]]
    # every group at 100%
    assert loader.importance_selection(ids, len(ids), 1.0) == [list(range(8))] * 2

    for share in (0.0, 1.5, float("nan")):
        with pytest.raises(kvfs.InvalidRequest):
            loader.importance_selection(ids, len(ids), share)
    with pytest.raises(kvfs.InvalidRequest):  # past the full chunks
        loader.importance_selection(ids, len(ids) + CHUNK, 0.5)


def test_chunks_without_importance_and_bad_input(tmp_path: Path) -> None:
    spec = kvfs.ModelSpec("kvfs/python-test", "f32", LAYERS, HEADS, DIM, revision="t2", chunk_tokens=CHUNK)
    loader = kvfs.Loader(tmp_path, spec)
    ids = list(range(2 * CHUNK))
    layout, _ = rows(len(ids))
    table = list(range(len(ids)))
    # the wrong shape, a score outside [0, 1]: refused, nothing stored
    for bad in ([[[0.1, 0.1]]], [[[0.1, 0.1], [0.1, 0.1, 0.1]]], [[[0.1, 1.5], [0.1, 0.1]]]):
        with pytest.raises(kvfs.InvalidRequest):
            loader.store(ids, layout, table, importance=bad)
    assert loader.lookup(ids) == 0
    # importance for the first chunk only: the second has none
    loader.store(ids, layout, table, importance=[[[0.5, 0.1], [0.2, 0.2]]])
    assert loader.importance_selection(ids, CHUNK, 0.5) == [[0], [0]]
    with pytest.raises(kvfs.InvalidRequest, match="no importance"):
        loader.importance_selection(ids, 2 * CHUNK, 0.5)
    # a chunk gone: an I/O error
    os.remove(loader.chunk_paths(ids)[0])
    with pytest.raises(kvfs.KvfsIOError):
        loader.importance_selection(ids, CHUNK, 0.5)
