"""scripts/bench-vllm: time to first token of vLLM CPU (SmolLM2-135M bf16, eager, vLLM's prefix
cache off) with a full prefill, vLLM's ExampleConnector, and kvfs through a mount (page cache
warm, dropped, and from S3 on an empty host), at several prompt sizes, plus prompts sharing
75% of their tokens with an earlier one; then the loader alone against fio and memcpy.

Each configuration is a fresh engine process (vllm_engine.py) that runs its prompts one after
the other; a figure is the wall time of `generate` with max_tokens=1. To hold on a shared
machine, every reuse configuration runs `--rounds` times, the rounds interleaved (Example,
kvfs warm, kvfs dropped, kvfs from S3, then again), each engine repeating each prompt `--reps`
times; a figure is the median of those requests. Ratios are taken between medians of the same
run.

An engine that dies (vLLM's ExampleConnector crashes its engine when it reuses an
8,191-token prompt: its load ignores chunked prefill) costs only the request that killed it:
that prompt is recorded as "crashed: <reason>" for the configuration and a fresh engine
continues with the rest.

The store overhead (the first request of a prompt, whose prefill stores its chunks, against the
same prompt in an engine without a connector) is measured over `--store-rounds` rounds, each
three fresh engines in rotating order: no connector, kvfs storing asynchronously (the default:
the step copies the rows, a writer thread writes them) and kvfs storing in the step
(`kvfs_store_async: false`), each kvfs one through a fresh mount over an empty cache
directory; a figure is the median of the rounds' ratios.

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
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
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


@dataclass
class Outcome:
    """What one configuration measured for one prompt: every request's seconds, the tokens
    reused, or why the engine died on it."""

    seconds: list[float] = field(default_factory=list)
    cached: int = 0
    crashed: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


def crash_reason(log: Path) -> str:
    """The root cause an engine's log names: the first `SomethingError: message` line (vLLM
    ends with a generic EngineDeadError that points back to it), shortened."""
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines()]
    errs = [m.group(1) for l in lines if (m := re.search(r"\b(\w*(?:Error|Exception): .*)", l))]
    specific = [e for e in errs if not e.startswith("EngineDeadError")]
    reason = (specific or errs or lines or ["no output"])[0]
    return reason[:200].replace("|", "/")


def engine(args, work: Path, name: str, seq: list[str], kv: dict | None, *, drop=False,
           results: dict[str, Outcome] | None = None) -> dict[str, Outcome]:
    """Runs the prompts `seq` in order in fresh engines, folding each request into `results`.
    When an engine dies, the request it was serving is recorded as crashed, every later
    request of that prompt is dropped, and a fresh engine serves what is left."""
    results = {} if results is None else results
    attempt = 0
    while seq:
        out = work / f"{name}-{attempt}.json"
        cmd = [sys.executable, str(HERE / "vllm_engine.py"), "--model", args.model, "--text", str(args.text)]
        for p in seq:
            cmd += ["--prompt", p]
        cmd += ["--max-tokens", "1", "--no-prefix-caching", "--warmup", "--out", str(out)]
        if drop:
            cmd.append("--drop-caches")
        if kv is not None:
            cmd += ["--kv", json.dumps(kv)]
        log = work / f"{name}-{attempt}.log"
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_NUM_OF_RESERVED_CPU="1")
        with log.open("w") as f:
            rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        done = json.loads(out.read_text())["results"] if out.exists() else []
        for x in done:
            o = results.setdefault(x["prompt"], Outcome())
            o.seconds.append(x["seconds"])
            o.cached = x["num_cached_tokens"]
        print(f"  {name}: " + ", ".join(f"{x['prompt_tokens']} tok {x['seconds']:.2f} s (cached {x['num_cached_tokens']})" for x in done), flush=True)
        if rc == 0 and len(done) == len(seq):
            break
        if len(done) >= len(seq):
            raise SystemExit(f"{name} exited {rc} after its last request; see {log}")
        bad = seq[len(done)]
        reason = crash_reason(log)
        results.setdefault(bad, Outcome()).crashed = reason
        print(f"  {name}: engine died on {bad} (rc {rc}): {reason}", flush=True)
        seq = [p for p in seq[len(done) + 1 :] if p != bad]
        attempt += 1
    return results


def kvfs_cfg(path: Path, *, store_async: bool = True) -> dict:
    return {
        "kv_connector": "KvfsConnector",
        "kv_connector_module_path": "kvfs.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"kvfs_path": str(path), "kvfs_store_async": store_async},
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


def warm(dir: Path) -> None:
    """Reads every file under `dir`, so the page cache holds them."""
    for f in dir.rglob("*"):
        if f.is_file():
            f.read_bytes()


def fio_read(dir: Path, *, direct: bool, bs: int, jobs: int) -> float:
    """fio sequential-read GB/s over every file under `dir` (`--opendir`: a `--filename` list
    of 60 chunk paths passes fio's 4,096-character limit, which is why an earlier version of
    this script printed no fio figure), `jobs` jobs of `bs`-byte requests (the loader's request
    size and reader threads), O_DIRECT or through the page cache (left as it is). Raises with
    fio's own message when fio is missing or fails."""
    cmd = ["fio", "--name=kvc", "--rw=read", f"--bs={bs}", f"--direct={int(direct)}",
           "--ioengine=psync", "--invalidate=0", f"--numjobs={jobs}", "--group_reporting",
           f"--opendir={dir}", "--output-format=json"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise RuntimeError(f"fio did not run: {e}") from e
    if r.returncode != 0:
        raise RuntimeError(f"fio failed ({r.returncode}): {(r.stderr or r.stdout).strip()[:300]}")
    # fio may print notes before its JSON
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["read"]
    return job["bw_bytes"] / 1e9


def loader_figures(dir: Path, n: int, reps: int) -> list[str]:
    """The loader alone, from Python, as the connector calls it: n tokens of SmolLM2-shaped KV
    (30 layers, 3 KV heads, head dim 64, bf16, 128-token chunks) stored in a cache directory
    on the bench's disk, then loaded into a vLLM-CPU-shaped cache with full verification,
    page cache warm and dropped (median of `reps`), each next to its peer on the same bytes:
    a memcpy of the KV (torch), fio through the page cache, fio O_DIRECT after a drop."""
    import torch

    import kvfs
    from kvfs.vllm import cpu_attn_views

    spec = kvfs.ModelSpec("bench/smollm2-shape", "bf16", 30, 3, 64, revision="bench", chunk_tokens=128)
    blocks = n // 128
    kvs = [torch.randn(blocks, 3, 128, 128).to(torch.bfloat16) for _ in range(30)]
    views = [cpu_attn_views(kv, 64) for kv in kvs]
    layout = kvfs.layout_from_views([k for k, _ in views], [v for _, v in views])
    dir.mkdir(parents=True, exist_ok=True)
    threads = 4  # the connector's default (kvfs_threads)
    loader = kvfs.Loader(dir, spec, threads=threads, verify="full")
    tokens = list(range(blocks * 128))
    loader.store(tokens, layout, list(range(blocks)))
    span = 128 * 3 * 64 * 2 * 2  # one layer of one chunk, K and V: one read
    gbps: dict[str, list[float]] = {"warm": [], "dropped": []}
    nbytes = 0
    for _ in range(reps):
        for mode in ("warm", "dropped"):
            if mode == "dropped":
                drop_caches()
            else:
                warm(dir)
            t = time.monotonic()
            stats = loader.load(tokens, layout, list(range(blocks))).wait()
            gbps[mode].append(stats["bytes_needed"] / (time.monotonic() - t) / 1e9)
            nbytes = stats["bytes_needed"]
    src = torch.cat([kv.flatten() for kv in kvs])
    dst = torch.empty_like(src)
    mem = []
    for _ in range(reps):
        t = time.monotonic()
        dst.copy_(src)
        mem.append(src.numel() * 2 / (time.monotonic() - t) / 1e9)
    out = [
        f"loader alone, {blocks * 128:,} tokens ({nbytes / 1e6:.0f} MB of KV into a vLLM CPU cache, full "
        f"verification, {threads} threads, median of {reps}):",
        f"- page cache warm: {statistics.median(gbps['warm']):.2f} GB/s; memcpy of the same "
        f"bytes (torch copy_): {statistics.median(mem):.2f} GB/s",
    ]
    warm(dir)
    try:
        fio_warm = fio_read(dir, direct=False, bs=span, jobs=threads)
        out[-1] += f"; fio through the page cache ({span // 1024} KiB reads, {threads} jobs): {fio_warm:.2f} GB/s"
    except RuntimeError as e:
        out[-1] += f"; fio: {e}"
    out.append(f"- page cache dropped: {statistics.median(gbps['dropped']):.2f} GB/s")
    drop_caches()
    try:
        fio_cold = fio_read(dir, direct=True, bs=span, jobs=threads)
        out[-1] += f"; fio O_DIRECT after a drop ({span // 1024} KiB reads, {threads} jobs): {fio_cold:.2f} GB/s"
    except RuntimeError as e:
        out[-1] += f"; fio: {e}"
    return out


@contextlib.contextmanager
def mounted(args, cache: Path, mnt: Path, config: Path | None = None):
    """`kvfs mount` of `cache` on `mnt` (with an S3 tier when `config` names one), unmounted on
    exit."""
    mnt.mkdir(exist_ok=True)
    cmd = [args.kvfs_bin]
    if config is not None:
        cmd += ["--config", str(config)]
    cmd += ["--cache-dir", str(cache), "mount", str(mnt)]
    with (cache.parent / f"{cache.name}.mount.log").open("w") as log:
        mount = subprocess.Popen(cmd, env=dict(os.environ, KVFS_LOG="warn"), stderr=log)
    try:
        while not (mnt / ".kvfs" / "mount.json").exists():
            if mount.poll() is not None:
                raise SystemExit(f"kvfs mount of {mnt} exited")
            time.sleep(0.05)
        yield mnt
    finally:
        subprocess.run([args.kvfs_bin, "umount", str(mnt)], capture_output=True)
        mount.wait(timeout=60)


def cell(o: Outcome | None, base: float | None = None, *, cached: bool = True) -> str:
    """A table cell: median seconds (tokens reused) = ratio to `base`, or the crash."""
    if o is None:
        return "not run"
    if o.crashed and not o.seconds:
        return f"crashed: {o.crashed}"
    s = f"{o.median:.2f} s"
    if cached:
        s += f" ({o.cached:,})"
    if base:
        s += f" = {o.median / base:.3f}x"
    if o.crashed:
        s += f" (one engine crashed: {o.crashed})"
    return s


def ratio_cell(ratios: list[float]) -> str:
    """The median of per-round ratios, and the rounds'."""
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.2f}x (rounds: {', '.join(f'{x:.2f}' for x in ratios)})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--kvfs-bin", required=True)
    ap.add_argument("--sizes", default="1024,4096,8191")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the reuse configurations")
    ap.add_argument("--store-rounds", type=int, default=3,
                    help="rounds of (full prefill, first request storing into an empty cache)")
    ap.add_argument("--reps", type=int, default=2, help="requests of each prompt per engine")
    ap.add_argument("--work", default=None)
    ap.add_argument("--loader-only", action="store_true", help="only the loader, fio and memcpy figures")
    ap.add_argument("--store-only", action="store_true",
                    help="only the store rounds: the first request storing against the full prefill")
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
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"bench-vllm in {work}, {started:%Y-%m-%d %H:%M} UTC, load average {os.getloadavg()}", flush=True)
    if args.loader_only:
        print("\n".join(loader_figures(work / "loader-cache", sizes[-1], max(args.reps, 3))))
        return

    sys.path.insert(0, str(HERE))
    from conftest import s3_config, s3_endpoint

    reps = [p for _ in range(args.reps) for p in prompts]
    base: dict[str, Outcome] = {}
    kv_store: dict[str, Outcome] = {}
    # per prompt, each store round's ratio (first request storing / full prefill)
    store_ratios: dict[str, list[float]] = {p: [] for p in prompts}
    sync_ratios: dict[str, list[float]] = {p: [] for p in prompts}
    ex_dir = work / "example"
    ex_dir.mkdir(exist_ok=True)
    ex_store = {} if args.store_only else engine(args, work, "example-store", prompts, example_cfg(ex_dir))
    ex_hit: dict[str, Outcome] = {}
    kv_warm: dict[str, Outcome] = {}
    kv_cold: dict[str, Outcome] = {}
    kv_s3: dict[str, Outcome] = {}
    with contextlib.ExitStack() as stack:
        s3 = stack.enter_context(s3_endpoint())
        # uploads queued, not inside the engine's store (the first-request-with-store figure
        # is the local store's); `kvfs sync push` finishes them before host B starts
        config = s3_config(work / "s3.toml", s3, write_through=False) if s3 else None
        mnt = stack.enter_context(mounted(args, work / "kvfs-cache", work / "kvfs-mnt", config))
        for r in range(args.store_rounds):
            # A pair of fresh engines, in alternating order; the kvfs one stores into an empty
            # cache through a fresh mount (the last round's is the one the reuse rounds read).
            last = r == args.store_rounds - 1
            round_base: dict[str, Outcome] = {}
            round_store: dict[str, Outcome] = {}
            round_sync: dict[str, Outcome] = {}
            kinds = ["base", "store", "sync"]
            for which in kinds[r % 3:] + kinds[: r % 3]:
                if which == "base":
                    engine(args, work, f"full-prefill-{r}", prompts, None, results=round_base)
                elif which == "store" and last:
                    engine(args, work, f"kvfs-store-{r}", prompts, kvfs_cfg(mnt), results=round_store)
                else:
                    cache = work / f"kvfs-{which}-cache-{r}"
                    cfg = lambda m: kvfs_cfg(m, store_async=which == "store")  # noqa: E731
                    out = round_store if which == "store" else round_sync
                    with mounted(args, cache, work / f"kvfs-{which}-mnt-{r}") as m:
                        engine(args, work, f"kvfs-{which}-{r}", prompts, cfg(m), results=out)
                    shutil.rmtree(cache, ignore_errors=True)
            for p in prompts:
                b, st, sy = round_base.get(p), round_store.get(p), round_sync.get(p)
                if b and st and b.median and st.median:
                    store_ratios[p].append(st.median / b.median)
                if b and sy and b.median and sy.median:
                    sync_ratios[p].append(sy.median / b.median)
                for src, dst in ((round_base, base), (round_store, kv_store)):
                    if p in src:
                        o = dst.setdefault(p, Outcome())
                        o.seconds += src[p].seconds
                        o.cached = src[p].cached
                        o.crashed = o.crashed or src[p].crashed
        if args.store_only:
            print(f"store overhead, load average at the end {os.getloadavg()}:")
            for n in sizes:
                p = full[n]
                print(f"| {n:,} | {cell(base.get(p), cached=False)} | {cell(kv_store.get(p), cached=False)} "
                      f"| {ratio_cell(store_ratios[p])} | {ratio_cell(sync_ratios[p])} |")
            return
        for r in range(args.rounds):
            # the shared prompts once, in the first round: their first request is the measure
            extra = [shared[n] for n in sizes] if r == 0 else []
            # "warm": the files are in the page cache (a dropped round, or another process,
            # may have evicted them; kvfs's O_DIRECT reads of cold chunks do not refill it)
            warm(ex_dir)
            engine(args, work, f"example-hit-{r}", reps + extra, example_cfg(ex_dir), results=ex_hit)
            warm(work / "kvfs-cache")
            engine(args, work, f"kvfs-warm-{r}", reps + extra, kvfs_cfg(mnt), results=kv_warm)
            engine(args, work, f"kvfs-dropped-{r}", reps, kvfs_cfg(mnt), drop=True, results=kv_cold)
            if s3 is not None:
                push = subprocess.run(
                    [args.kvfs_bin, "--config", str(config), "--cache-dir", str(work / "kvfs-cache"),
                     "sync", "push", "--quiet"], capture_output=True, text=True, timeout=1200)
                if push.returncode != 0:
                    print(f"  kvfs sync push failed ({push.returncode}): {push.stderr.strip()[-300:]}", flush=True)
                # host B: an empty cache over the same bucket; each prompt's first request
                with mounted(args, work / f"kvfs-cache-b{r}", work / f"kvfs-mnt-b{r}", config) as mb:
                    engine(args, work, f"kvfs-s3-{r}", prompts, kvfs_cfg(mb), results=kv_s3)

    rows = []
    for n in sizes:
        p, s = full[n], shared[n]
        b = base[p].median
        kw = kv_warm.get(p)
        w = kw.median if kw else None
        store_ratio = lambda o: f"{o[p].median / b:.2f}x" if p in o and o[p].median and b else cell(o.get(p))
        kv_store_cell = (
            f"{ratio_cell(store_ratios[p])}; in the step: {ratio_cell(sync_ratios[p])}"
            if store_ratios[p] else store_ratio(kv_store)
        )
        rows.append(
            f"| {n:,} | {cell(base[p], cached=False)} | {cell(ex_hit.get(p), b)} | {cell(kw, b)} "
            f"| {(ex_hit[p].median / w) if p in ex_hit and ex_hit[p].median and w else float('nan'):.2f}x "
            f"| {cell(kv_cold.get(p), w, cached=False)} warm "
            f"| {cell(kv_s3.get(p), w) + ' warm' if s3 else 'no S3 server'} "
            f"| {kv_store_cell} / {store_ratio(ex_store)} "
            f"| {ex_hit[s].cached if s in ex_hit else '-'} / {kv_warm[s].cached if s in kv_warm else '-'}: "
            f"{cell(kv_warm.get(s), b, cached=False)} |"
        )
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print()
    ended = datetime.datetime.now(datetime.timezone.utc)
    print(f"{started:%Y-%m-%d %H:%M}-{ended:%H:%M} UTC, {platform.node()}: {os.cpu_count()} cores, {cpu}; "
          f"load average at the end {os.getloadavg()}; rounds {args.rounds}, requests per engine {args.reps}, "
          f"store rounds {args.store_rounds}")
    print("| prompt tokens | full prefill | ExampleConnector (reused) = x full | kvfs mount, warm (reused) = x full "
          "| kvfs speed-up over Example | kvfs, caches dropped = x warm | kvfs from S3, empty host (reused) = x warm "
          "| first request with store, x full prefill: kvfs, writer thread (median of rounds); in the step / Example | 75%-shared prompt reused: Example / kvfs; kvfs TTFT |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(r)
    print()
    print("\n".join(loader_figures(work / "loader-cache", sizes[-1], 3)))


if __name__ == "__main__":
    main()
