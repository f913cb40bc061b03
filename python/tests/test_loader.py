"""The kvfs Python package against real files and vLLM's own CPU attention kernel: the
KvLayout derived for vLLM's CPU cache places every value where the kernel put it, stores and
loads round-trip, loads go layer by layer, and every bad input is a typed exception."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import need, required

try:
    import torch

    import kvfs
    from kvfs.vllm import _VERIFIED_ISAS, _cpu_attn_isa, cpu_attn_views
    from vllm import _custom_ops as vllm_ops

    _missing = ""
except ImportError as e:  # the venv of scripts/install-vllm is not the one running
    _missing = f"kvfs, torch or vllm is not importable ({e}); run scripts/install-vllm"

if _missing:
    if required("vllm"):
        pytest.fail(f"KVFS_REQUIRE includes vllm: {_missing}", pytrace=False)
    pytest.skip(_missing, allow_module_level=True)

HEADS, DIM, BS = 3, 64, 32


def spec(dtype: str, layers: int = 2, chunk: int = BS) -> kvfs.ModelSpec:
    return kvfs.ModelSpec("kvfs/python-test", dtype, layers, HEADS, DIM, revision="t1", chunk_tokens=chunk)


def cpu_cache(layers: int, blocks: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """vLLM's CPU attention cache: per layer [blocks, heads, block_size, 2 * head_dim]."""
    return [torch.zeros(blocks, HEADS, BS, 2 * DIM, dtype=dtype) for _ in range(layers)]


def fill_with_kernel(kv: torch.Tensor, key: torch.Tensor, value: torch.Tensor, table: list[int]) -> None:
    """Writes K and V of positions 0.. into the blocks `table` with vLLM's own kernel, viewed
    the way CPUAttentionBackendImpl views the cache."""
    nb = kv.shape[0]
    isa = _cpu_attn_isa(kv.dtype, BS, DIM, "auto")
    need("vllm", isa in _VERIFIED_ISAS, f"CPU attention ISA {isa} is not one kvfs verified")
    k_cache, v_cache = kv.view(nb, HEADS, 2 * BS, DIM).chunk(2, dim=2)
    slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(key.shape[0])], dtype=torch.long)
    vllm_ops.cpu_attn_reshape_and_cache(key, value, k_cache, v_cache, slots, isa)


def layout_of(kvs: list[torch.Tensor]) -> kvfs.KvLayout:
    views = [cpu_attn_views(kv, DIM) for kv in kvs]
    return kvfs.layout_from_views([k for k, _ in views], [v for _, v in views])


def rows_layout(k: list[torch.Tensor], v: list[torch.Tensor]) -> kvfs.KvLayout:
    """A plain destination: per layer K and V [tokens, heads, dim] (block size 1)."""
    t = k[0].shape[0]
    return kvfs.layout_from_views(
        [x.view(t, HEADS, 1, DIM) for x in k], [x.view(t, HEADS, 1, DIM) for x in v]
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_vllm_cpu_layout_matches_the_kernel_and_round_trips(tmp_path: Path, dtype: torch.dtype) -> None:
    layers, tokens = 2, 3 * BS + 5  # three full chunks and a partial one
    torch.manual_seed(0)
    keys = [torch.randn(tokens, HEADS, DIM).to(dtype) for _ in range(layers)]
    values = [torch.randn(tokens, HEADS, DIM).to(dtype) for _ in range(layers)]
    table = [4, 1, 5, 0]
    kvs = cpu_cache(layers, 6, dtype)
    for kv, k, v in zip(kvs, keys, values):
        fill_with_kernel(kv, k, v, table)
    ids = list(range(1000, 1000 + tokens))
    name = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}[dtype]
    loader = kvfs.Loader(tmp_path, spec(name, layers), verify="full")

    st = loader.store(ids, layout_of(kvs), table)
    assert (st["written"], st["present"]) == (3, 0)
    assert loader.lookup(ids) == 3 * BS

    # Load into plain rows: every value equals what the kernel was given.
    k_out = [torch.zeros(3 * BS, HEADS, DIM, dtype=dtype) for _ in range(layers)]
    v_out = [torch.zeros(3 * BS, HEADS, DIM, dtype=dtype) for _ in range(layers)]
    h = loader.load(ids, rows_layout(k_out, v_out), list(range(3 * BS)))
    for layer in range(layers):
        h.wait_layer(layer)
    stats = h.wait()
    assert stats["chunks"] == 3 and stats["tokens"] == 3 * BS
    for layer in range(layers):
        assert torch.equal(k_out[layer], keys[layer][: 3 * BS])
        assert torch.equal(v_out[layer], values[layer][: 3 * BS])

    # Load into another CPU cache at other blocks: the blocks equal the kernel's, byte for byte.
    other = [3, 0, 2]
    kvs2 = cpu_cache(layers, 6, dtype)
    loader.load(ids, layout_of(kvs2), other).wait()
    for kv, kv2 in zip(kvs, kvs2):
        for b, b2 in zip(table[:3], other):
            assert torch.equal(kv[b], kv2[b2])
        assert not kv2[1].any() and not kv2[4].any() and not kv2[5].any()


def test_a_prompt_tail_is_stored_found_and_loaded_to_the_last_token(tmp_path: Path) -> None:
    """The connector's reuse up to the last prompt token: `store(tail=True)` adds the
    partial last chunk, `lookup` of exactly these tokens finds all of them (an extended or
    changed tail does not), and a load up to the token before the last places every value the
    kernel wrote, leaving the last position alone."""
    layers, tokens = 2, 3 * BS + 5
    torch.manual_seed(1)
    keys = [torch.randn(tokens, HEADS, DIM).to(torch.bfloat16) for _ in range(layers)]
    values = [torch.randn(tokens, HEADS, DIM).to(torch.bfloat16) for _ in range(layers)]
    table = [4, 1, 5, 0]
    kvs = cpu_cache(layers, 6, torch.bfloat16)
    for kv, k, v in zip(kvs, keys, values):
        fill_with_kernel(kv, k, v, table)
    ids = list(range(2000, 2000 + tokens))
    loader = kvfs.Loader(tmp_path, spec("bf16", layers), verify="full")
    st = loader.store(ids, layout_of(kvs), table)
    assert (st["written"], loader.lookup(ids)) == (3, 3 * BS)
    st = loader.store(ids, layout_of(kvs), table, tail=True)
    assert (st["written"], st["present"]) == (1, 3)
    assert loader.lookup(ids) == tokens
    assert loader.lookup(ids + [7]) == 3 * BS
    assert loader.lookup(ids[:-1] + [ids[-1] + 1]) == 3 * BS

    k_out = [torch.zeros(tokens, HEADS, DIM, dtype=torch.bfloat16) for _ in range(layers)]
    v_out = [torch.zeros(tokens, HEADS, DIM, dtype=torch.bfloat16) for _ in range(layers)]
    h = loader.load(ids, rows_layout(k_out, v_out), list(range(tokens)), end=tokens - 1)
    stats = h.wait()
    assert (stats["chunks"], stats["tokens"]) == (4, tokens - 1)
    for layer in range(layers):
        assert torch.equal(k_out[layer][:-1], keys[layer][:-1])
        assert torch.equal(v_out[layer][:-1], values[layer][:-1])
        assert not k_out[layer][-1].any() and not v_out[layer][-1].any()
    # past the sequence is refused before any read
    with pytest.raises(kvfs.InvalidRequest):
        loader.load(ids, rows_layout(k_out, v_out), list(range(tokens)), end=tokens + 1)


def test_a_snapshot_stores_what_the_blocks_held_when_it_was_taken(tmp_path: Path) -> None:
    """The connector's asynchronous store: `snapshot` copies the rows out of the blocks, the
    engine may then reuse them, and `store_snapshot` (another thread's) writes the copy."""
    layers, tokens = 2, 2 * BS + 9
    torch.manual_seed(2)
    keys = [torch.randn(tokens, HEADS, DIM).to(torch.bfloat16) for _ in range(layers)]
    values = [torch.randn(tokens, HEADS, DIM).to(torch.bfloat16) for _ in range(layers)]
    table = [2, 0, 3]
    kvs = cpu_cache(layers, 4, torch.bfloat16)
    for kv, k, v in zip(kvs, keys, values):
        fill_with_kernel(kv, k, v, table)
    ids = list(range(3000, 3000 + tokens))
    loader = kvfs.Loader(tmp_path, spec("bf16", layers), salt=b"a")
    snap = loader.snapshot(ids, layout_of(kvs), table, tail=True)
    assert snap.positions == (0, tokens)
    assert snap.bytes == layers * 2 * tokens * HEADS * DIM * 2
    for kv in kvs:
        kv.fill_(7.0)  # the engine reuses the blocks
    assert loader.lookup(ids) == 0
    with pytest.raises(kvfs.InvalidRequest):
        kvfs.Loader(tmp_path, spec("bf16", layers), salt=b"b").store_snapshot(snap)
    st = loader.store_snapshot(snap)
    assert (st["written"], st["present"]) == (3, 0)
    assert loader.lookup(ids) == tokens
    k_out = [torch.zeros(tokens, HEADS, DIM, dtype=torch.bfloat16) for _ in range(layers)]
    v_out = [torch.zeros(tokens, HEADS, DIM, dtype=torch.bfloat16) for _ in range(layers)]
    loader.load(ids, rows_layout(k_out, v_out), list(range(tokens)), end=tokens).wait()
    for layer in range(layers):
        assert torch.equal(k_out[layer], keys[layer])
        assert torch.equal(v_out[layer], values[layer])
    # every chunk present: the next snapshot holds nothing
    assert loader.snapshot(ids, layout_of(kvs), table, tail=True).bytes == 0


def test_load_range_and_layer_wise_waits(tmp_path: Path) -> None:
    layers = 4
    kvs = cpu_cache(layers, 8, torch.bfloat16)
    for kv in kvs:
        kv.normal_()
    ids = list(range(4 * BS))
    loader = kvfs.Loader(tmp_path, spec("bf16", layers))
    table = [7, 6, 5, 4]
    loader.store(ids, layout_of(kvs), table)
    kvs2 = cpu_cache(layers, 8, torch.bfloat16)
    # positions 32..96 only: blocks 1 and 2 of the request
    h = loader.load(ids, layout_of(kvs2), [0, 1, 2, 3], start=BS, end=3 * BS)
    assert h.num_layers == layers
    for layer in range(layers):
        h.wait_layer(layer)
    assert h.wait()["tokens"] == 2 * BS
    for kv, kv2 in zip(kvs, kvs2):
        assert torch.equal(kv[6], kv2[1]) and torch.equal(kv[5], kv2[2])
        assert not kv2[0].any() and not kv2[3].any()
    with pytest.raises(kvfs.InvalidRequest):
        h.wait()


def test_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(kvfs.SpecError):
        kvfs.ModelSpec("m", "int7", 2, HEADS, DIM)
    with pytest.raises(kvfs.KvfsIOError):
        kvfs.Loader(tmp_path / "absent", spec("bf16"))
    with pytest.raises(kvfs.InvalidRequest):
        kvfs.Loader(tmp_path, spec("bf16"), io="mmap")
    kvs = cpu_cache(2, 4, torch.bfloat16)
    for kv in kvs:
        kv.normal_()
    layout = layout_of(kvs)
    # a region shorter than the shape
    k, v = cpu_attn_views(kvs[0], DIM)
    with pytest.raises(kvfs.LayoutError):
        kvfs.layout_from_views([k[:2]], [v])
    loader = kvfs.Loader(tmp_path, spec("bf16"), verify="full")
    ids = list(range(3 * BS))
    loader.store(ids, layout, [0, 1, 2])
    # a block id outside the cache, a range beyond the sequence, a model of other shape
    with pytest.raises(kvfs.LayoutError):
        loader.load(ids, layout, [0, 9, 2])
    with pytest.raises(kvfs.InvalidRequest):
        loader.load(ids[: 2 * BS], layout, [0, 1, 2], end=3 * BS)
    with pytest.raises(kvfs.LayoutError):
        kvfs.Loader(tmp_path, spec("bf16", layers=3)).load(ids, layout, [0, 1, 2])

    # a flipped payload byte in chunk 1: ChunkError says chunk 0 (block 3) is valid
    path = Path(loader.chunk_paths(ids)[1])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # inside a layer's payload
    path.write_bytes(bytes(data))
    dst = cpu_cache(2, 4, torch.bfloat16)
    h = loader.load(ids, layout_of(dst), [3, 2, 1])
    with pytest.raises(kvfs.ChunkError) as e:
        h.wait()
    assert e.value.chunk == 1
    assert e.value.valid_tokens == BS
    assert e.value.valid_blocks == [3]
    assert isinstance(e.value, kvfs.KvfsError)
    # the missing chunk 2 after a good one: the hit ends at chunk 1
    Path(loader.chunk_paths(ids)[2]).unlink()
    assert loader.lookup(ids) == 2 * BS


def test_namespace_names_what_makes_kv_reusable() -> None:
    base = spec("bf16")
    assert base.namespace_dir == spec("bf16").namespace_dir
    others = [
        spec("f16"),
        spec("bf16", layers=3),
        kvfs.ModelSpec("kvfs/python-test", "bf16", 2, HEADS, DIM, revision="t2", chunk_tokens=BS),
        kvfs.ModelSpec("kvfs/python-test", "bf16", 2, HEADS, DIM, revision="t1", chunk_tokens=BS, tp_size=2, tp_rank=1),
        kvfs.ModelSpec("kvfs/python-test", "bf16", 2, 2, DIM, revision="t1", chunk_tokens=BS),
    ]
    ids = {s.namespace_id for s in others} | {base.namespace_id}
    assert len(ids) == len(others) + 1


def test_codec_option_stores_coded_chunks_and_loads_them_decoded(tmp_path: Path) -> None:
    layers, tokens = 2, 2 * BS
    torch.manual_seed(1)
    keys = [torch.randn(tokens, HEADS, DIM).to(torch.bfloat16) for _ in range(layers)]
    values = [torch.randn(tokens, HEADS, DIM).to(torch.bfloat16) for _ in range(layers)]
    ids = list(range(500, 500 + tokens))
    raw = spec("bf16")
    for codec, exact in [("lossless", True), ("fp8", False), ("int8", False)]:
        s = kvfs.ModelSpec("kvfs/python-test", "bf16", layers, HEADS, DIM, revision="t1", chunk_tokens=BS, codec=codec)
        # lossless is the same cache as raw; a lossy codec is a namespace of its own
        assert (s.namespace_id == raw.namespace_id) == exact
        (tmp_path / codec).mkdir()
        loader = kvfs.Loader(tmp_path / codec, s)
        assert loader.store(ids, rows_layout(keys, values), list(range(tokens)))["written"] == 2
        k_out = [torch.zeros(tokens, HEADS, DIM, dtype=torch.bfloat16) for _ in range(layers)]
        v_out = [torch.zeros(tokens, HEADS, DIM, dtype=torch.bfloat16) for _ in range(layers)]
        loader.load(ids, rows_layout(k_out, v_out), list(range(tokens))).wait()
        for layer in range(layers):
            for got, want in [(k_out[layer], keys[layer]), (v_out[layer], values[layer])]:
                if exact:
                    assert torch.equal(got, want)
                else:
                    # e4m3 keeps 3 mantissa bits (half a step: 1/16 of a value), then bf16
                    # rounding: well within 1/8 of the largest value, and not exact; int8's
                    # half step is at most 1/226 of a row's largest value, plus bf16 rounding
                    err = (got.float() - want.float()).abs().amax()
                    bound = 8 if codec == "fp8" else 64
                    assert 0 < err <= want.float().abs().amax() / bound
    with pytest.raises(kvfs.SpecError):
        kvfs.ModelSpec("m", "bf16", 2, HEADS, DIM, codec="zip9")
