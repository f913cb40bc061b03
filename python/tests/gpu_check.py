"""The Python package on a CUDA GPU, without torch: run by `scripts/gpu-check` (not by
pytest) on the GPU machine, where nothing but the driver may be installed.

Device memory comes from the CUDA driver through ctypes (`cuMemAlloc`), which is what the
package itself never does (it reaches CUDA through kvfs-gds's dlopen). Checks, for the path
`KVFS_GPU_PATH` forces (or the probe's choice):

1. `CudaBackend.load` of real chunk files into a device `KvLayout` (vLLM's GPU cache,
   `[blocks, heads, block_size, 2 * head_dim]`, token-major in memory) equals `Loader.load` of
   the same request into host memory, byte for byte, with a shuffled block table and a partial
   range; `wait_layer(i, stream)` on a stream of our own, then `cuStreamSynchronize`;
2. the staged path (`verify="full"`) gives the same bytes;
3. `CudaBackend.store` from device blocks writes chunk files identical to the originals.

Exit status 0 = passed, 1 = failed, 3 = skipped (no libcuda, or the forced path unavailable).
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import kvfs

HEADS, DIM, BS, LAYERS, CHUNK = 4, 64, 16, 3, 32
ES = 2  # bf16


def cuda():
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        print(f"skipped: {e}")
        sys.exit(3)

    def call(name, *args):
        rc = getattr(lib, name)(*args)
        if rc != 0:
            raise RuntimeError(f"{name} failed: CUDA error {rc}")

    call("cuInit", 0)
    dev = ctypes.c_int()
    call("cuDeviceGet", ctypes.byref(dev), 0)
    ctx = ctypes.c_void_p()
    call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
    call("cuCtxSetCurrent", ctx)
    return lib, call


def main() -> int:
    _, call = cuda()
    probe_dir = os.environ.get("KVFS_GDS_TEST_DIR", ".")
    try:
        backend = kvfs.CudaBackend(probe_dir=probe_dir)
    except kvfs.CudaUnavailable as e:
        print(f"skipped: {e}")
        return 3
    print(backend.probe)
    work = Path(tempfile.mkdtemp(dir=probe_dir))
    try:
        return check(backend, call, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check(backend: kvfs.CudaBackend, call, work: Path) -> int:
    rng = random.Random(17)
    spec = kvfs.ModelSpec("kvfs/gpu-check", "bf16", LAYERS, HEADS, DIM, revision="g1", chunk_tokens=CHUNK)
    blocks = 24
    row = HEADS * DIM * ES
    per_layer = blocks * HEADS * BS * 2 * DIM * ES  # [blocks, heads, bs, 2*DIM]
    total = per_layer * LAYERS
    tokens = [rng.randrange(50000) for _ in range(4 * CHUNK)]

    def views(base: int):
        """K and V (address, extent) per layer and the strides of a token-major
        [blocks, block_size, heads, 2*DIM] buffer seen as [blocks, heads, block_size, DIM]."""
        k = [(base + l * per_layer, per_layer - DIM * ES) for l in range(LAYERS)]
        v = [(base + l * per_layer + DIM * ES, per_layer - DIM * ES) for l in range(LAYERS)]
        strides = (HEADS * 2 * DIM * ES, 2 * DIM * ES, ES)  # token, head, elem
        return k, v, strides

    def layout(base: int, device: str) -> kvfs.KvLayout:
        k, v, st = views(base)
        return kvfs.KvLayout(
            k, v, dtype="bf16", num_kv_heads=HEADS, head_dim=DIM, num_blocks=blocks,
            block_size=BS, block_stride=BS * HEADS * 2 * DIM * ES, k_strides=st, v_strides=st,
            device=device,
        )

    # Source chunks: random host blocks stored through the host path.
    src = (ctypes.c_ubyte * total).from_buffer_copy(os.urandom(total))
    src_dir = work / "src"
    src_dir.mkdir()
    loader = kvfs.Loader(src_dir, spec, io="direct")
    table = list(range(blocks))
    rng.shuffle(table)
    st = loader.store(tokens, layout(ctypes.addressof(src), "cpu"), table[: len(tokens) // BS])
    assert st["written"] == 4, st

    failures = 0
    dst_table = list(range(blocks))
    rng.shuffle(dst_table)
    start, end = 5, 4 * CHUNK - 3
    need = dst_table[: -(-end // BS)]
    want = (ctypes.c_ubyte * total)(*([0x5A] * total))
    loader.load(tokens, layout(ctypes.addressof(want), "cpu"), need, start, end).wait()

    dptr = ctypes.c_uint64()
    call("cuMemAlloc_v2", ctypes.byref(dptr), ctypes.c_size_t(total))
    stream = ctypes.c_void_p()
    call("cuStreamCreate", ctypes.byref(stream), 0)
    got = (ctypes.c_ubyte * total)()
    for verify in ("header", "full"):
        call("cuMemcpyHtoD_v2", dptr, (ctypes.c_ubyte * total)(*([0x5A] * total)), ctypes.c_size_t(total))
        h = backend.load(loader, tokens, layout(dptr.value, "cuda"), need, start, end, verify=verify)
        for layer in range(LAYERS):
            h.wait_layer(layer, stream.value)
        call("cuStreamSynchronize", stream)
        stats = h.wait()
        call("cuMemcpyDtoH_v2", got, dptr, ctypes.c_size_t(total))
        same = bytes(got) == bytes(want)
        print(f"load verify={verify} direct={verify == 'header'}: {'equal' if same else 'DIFFERENT'} to the host load; {stats}")
        failures += not same

    # Store from device blocks: the whole source arena on the device, stored again.
    call("cuMemcpyHtoD_v2", dptr, src, ctypes.c_size_t(total))
    out = work / "out"
    out.mkdir()
    out_loader = kvfs.Loader(out, spec)
    st = backend.store(out_loader, tokens, layout(dptr.value, "cuda"), table[: len(tokens) // BS])
    for a, b in zip(loader.chunk_paths(tokens), out_loader.chunk_paths(tokens)):
        same = Path(a).read_bytes() == Path(b).read_bytes()
        failures += not same
        if not same:
            print(f"stored chunk {b} differs from {a}")
    print(f"store from device: {st}")
    call("cuStreamDestroy_v2", stream)
    call("cuMemFree_v2", dptr)
    print("python CUDA check:", "passed" if not failures else f"FAILED ({failures})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
