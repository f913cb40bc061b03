"""scripts/bench-vllm: time to first token of vLLM CPU (SmolLM2-135M bf16, eager, vLLM's prefix
cache off) with a full prefill, vLLM's ExampleConnector, and kvfs through a mount (page cache
warm, and dropped), at several prompt sizes, plus prompts sharing 75% of their tokens with an
earlier one. Each configuration is one fresh engine process (vllm_engine.py) that runs its
prompts one after the other; a figure is the wall time of `generate` with max_tokens=1.

Every engine reserves one core for vLLM's engine process (VLLM_CPU_NUM_OF_RESERVED_CPU=1: with
a KV connector vLLM would otherwise reserve a different number), so all compute with the same
threads. Prompts are real English: the licence texts Debian's base-files ships in
/usr/share/common-licenses, concatenated.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LICENSES = ["GPL-3", "GPL-2", "LGPL-3", "LGPL-2.1", "Apache-2.0", "MPL-2.0", "Artistic"]


def corpus(path: Path) -> Path:
    texts = []
    for name in LICENSES:
        p = Path("/usr/share/common-licenses") / name
        if p.exists():
            texts.append(p.read_text())
    path.write_text("\n\n".join(texts))
    return path


def engine(args, work: Path, name: str, prompts: list[str], kv: dict | None) -> dict:
    out = work / f"{name}.json"
    cmd = [sys.executable, str(HERE / "vllm_engine.py"), "--model", args.model, "--text", str(args.text)]
    for p in prompts:
        cmd += ["--prompt", p]
    cmd += ["--max-tokens", "1", "--no-prefix-caching", "--warmup", "--out", str(out)]
    if kv is not None:
        cmd += ["--kv", json.dumps(kv)]
    log = work / f"{name}.log"
    with log.open("w") as f:
        rc = subprocess.run(cmd, env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_NUM_OF_RESERVED_CPU="1"), stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{name} failed; see {log}")
    r = json.loads(out.read_text())
    print(f"  {name}: " + ", ".join(f"{x['prompt_tokens']} tok {x['seconds']:.2f} s (cached {x['num_cached_tokens']})" for x in r["results"]), flush=True)
    return {x["prompt"]: x for x in r["results"]}


def kvfs_cfg(path: Path) -> dict:
    return {
        "kv_connector": "KvfsConnector",
        "kv_connector_module_path": "kvfs.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"kvfs_path": str(path)},
    }


def example_cfg(path: Path) -> dict:
    return {
        "kv_connector": "ExampleConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": str(path)},
    }


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def fio_read(dir: Path) -> float | None:
    """fio sequential read GB/s over the chunk files (O_DIRECT, 1 MiB, one job): the device's
    figure for the same bytes the loader reads."""
    files = sorted(str(p) for p in dir.rglob("*.kvc"))
    if not files:
        return None
    try:
        r = subprocess.run(
            ["fio", "--name=kvc", "--rw=read", "--bs=1M", "--direct=1", "--ioengine=psync",
             "--filename=" + ":".join(files), "--output-format=json"],
            capture_output=True, text=True, check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    job = json.loads(r.stdout)["jobs"][0]["read"]
    return job["bw_bytes"] / 1e9


def loader_gbps(dir: Path, n: int) -> tuple[float, float, int]:
    """The loader alone, from Python, as the connector calls it: n tokens of SmolLM2-shaped KV
    (30 layers, 3 KV heads, head dim 64, bf16, 128-token chunks) stored in a cache directory
    on the bench's disk, then loaded into a vLLM-CPU-shaped cache with full verification, page
    cache warm and dropped. Returns (warm GB/s, dropped GB/s, bytes) of KV placed."""
    import torch

    import kvfs
    from kvfs.vllm import cpu_attn_views

    spec = kvfs.ModelSpec("bench/smollm2-shape", "bf16", 30, 3, 64, revision="bench", chunk_tokens=128)
    blocks = n // 128
    kvs = [torch.randn(blocks, 3, 128, 128).to(torch.bfloat16) for _ in range(30)]
    views = [cpu_attn_views(kv, 64) for kv in kvs]
    layout = kvfs.layout_from_views([k for k, _ in views], [v for _, v in views])
    dir.mkdir(parents=True, exist_ok=True)
    loader = kvfs.Loader(dir, spec, verify="full")
    tokens = list(range(blocks * 128))
    loader.store(tokens, layout, list(range(blocks)))
    out = []
    for cold in (False, True):
        if cold:
            drop_caches()
        t = time.monotonic()
        stats = loader.load(tokens, layout, list(range(blocks))).wait()
        out.append(stats["bytes_needed"] / (time.monotonic() - t) / 1e9)
    return out[0], out[1], stats["bytes_needed"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--kvfs-bin", required=True)
    ap.add_argument("--sizes", default="1024,4096,8191")
    ap.add_argument("--work", default=None)
    ap.add_argument("--loader-only", action="store_true", help="only the loader and fio figures, on --work's cache")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="kvfs-bench-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    args.text = corpus(work / "corpus.txt")
    sizes = [int(s) for s in args.sizes.split(",")]
    # Each size starts at its own offset, so prompts of different sizes share no prefix; the
    # shared prompt keeps 75% of its size's prompt and continues with text from elsewhere.
    starts = {}
    at = 0
    for n in sizes:
        starts[n] = at
        at += n + 17
    full = {n: f"{starts[n]}:{n}" for n in sizes}
    shared = {n: f"{starts[n]}:{n * 3 // 4},{at + 101}:{n - n * 3 // 4}" for n in sizes}
    prompts = [full[n] for n in sizes]
    print(f"bench-vllm in {work}", flush=True)
    if args.loader_only:
        report_loader(work, sizes[-1])
        return

    base = engine(args, work, "full-prefill", prompts, None)

    ex_dir = work / "example"
    ex_dir.mkdir()
    ex_store = engine(args, work, "example-store", prompts, example_cfg(ex_dir))
    ex_hit = engine(args, work, "example-hit", prompts + [shared[n] for n in sizes], example_cfg(ex_dir))

    with mounted(args, work) as mnt:
        kv_store = engine(args, work, "kvfs-store", prompts, kvfs_cfg(mnt))
        kv_warm = engine(args, work, "kvfs-warm", prompts + [shared[n] for n in sizes], kvfs_cfg(mnt))
        drop_caches()
        kv_cold = engine(args, work, "kvfs-dropped", prompts, kvfs_cfg(mnt))

    rows = []
    for n in sizes:
        p, s = full[n], shared[n]
        t = base[p]["seconds"]
        rows.append(
            f"| {n:,} | {t:.2f} s | {ex_hit[p]['seconds']:.2f} s ({ex_hit[p]['num_cached_tokens']:,}) = {ex_hit[p]['seconds'] / t:.3f}x "
            f"| {kv_warm[p]['seconds']:.2f} s ({kv_warm[p]['num_cached_tokens']:,}) = {kv_warm[p]['seconds'] / t:.3f}x "
            f"| {kv_cold[p]['seconds']:.2f} s = {kv_cold[p]['seconds'] / kv_warm[p]['seconds']:.2f}x warm "
            f"| {kv_store[p]['seconds'] / t:.2f}x / {ex_store[p]['seconds'] / t:.2f}x "
            f"| {ex_hit[s]['num_cached_tokens']:,} / {kv_warm[s]['num_cached_tokens']:,}: {kv_warm[s]['seconds'] / t:.3f}x |"
        )
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print()
    print(f"{datetime.date.today()}, {platform.node()}: {os.cpu_count()} cores, {cpu}")
    print("| prompt tokens | full prefill | ExampleConnector (reused) | kvfs mount, warm (reused) | kvfs, caches dropped | first request with store: kvfs / Example | 75%-shared prompt reused: Example / kvfs, kvfs TTFT |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(r)
    report_loader(work, sizes[-1])


@contextlib.contextmanager
def mounted(args, work: Path):
    """`kvfs mount` of work/kvfs-cache on work/kvfs-mnt, unmounted on exit."""
    cache, mnt = work / "kvfs-cache", work / "kvfs-mnt"
    mnt.mkdir(exist_ok=True)
    mount = subprocess.Popen([args.kvfs_bin, "--cache-dir", str(cache), "mount", str(mnt)],
                             env=dict(os.environ, KVFS_LOG="warn"))
    try:
        while not (mnt / ".kvfs" / "mount.json").exists():
            if mount.poll() is not None:
                raise SystemExit("kvfs mount exited")
            time.sleep(0.05)
        yield mnt
    finally:
        subprocess.run([args.kvfs_bin, "umount", str(mnt)], capture_output=True)
        mount.wait(timeout=60)


def report_loader(work: Path, n: int) -> None:
    dir = work / "loader-cache"
    warm, cold, nbytes = loader_gbps(dir, n)
    gbps = fio_read(dir)
    print(f"\nloader alone, {n:,} tokens ({nbytes / 1e6:.0f} MB of KV into a vLLM CPU cache, full "
          f"verification): {warm:.2f} GB/s page cache warm, {cold:.2f} GB/s dropped")
    if gbps is not None:
        print(f"fio sequential O_DIRECT read (1 MiB) of the same chunk files: {gbps:.2f} GB/s")


if __name__ == "__main__":
    main()
