"""kvfs.vllm.KvfsConnector in real vLLM engines (CPU, SmolLM2-135M, bf16, eager), each engine
a fresh process (vllm_engine.py):

1. engine 1 serves a 1,100-token prompt of real English text (ending inside a block) and stores
   its chunks through a real kvfs mount (backed by S3 when a server is at hand): 8 full
   chunks and the partial last one; then a 1,024-token prompt (a whole number of blocks)
   that shares its first 896 tokens, and stores its last chunk;
2. engine 2, fresh, repeats both: the first gets num_cached_tokens = 1,099 (everything but
   the last token) from kvfs, the second 1,023 (896 from vLLM's own prefix cache, the first
   127 tokens of the last block from kvfs); both with the same 32 greedy tokens (and
   first-token logprob within tolerance) as an engine without a connector;
3. host B, an empty cache mounted over the same bucket, gets the same hit and tokens;
4. a chunk corrupted on disk is reported, recomputed, and the tokens stay the same;
5. the OpenAI-compatible server answers two requests, the second with cached tokens, and its
   /metrics shows the connector's figures (vllm:kvfs_*).

Needs the venv of scripts/install-vllm (KVFS_REQUIRE name `vllm`), the converted model
(`model`), /dev/fuse and the kvfs binary (`fuse`), and an S3 server for 3 (`s3`): Garage from
KVFS_TEST_S3_ENDPOINT (CI), else the in-process server examples/s3_server.rs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import Mount, fuse_ok, kvfs_bin, need, s3_config, s3_endpoint

TEXT = Path("/usr/share/common-licenses/GPL-3")  # base-files: real English, ~8,000 tokens
PROMPT = "0:1100"
# 1,024 tokens (a whole number of blocks, its last chunk full) sharing 7 blocks with PROMPT.
# Every engine serves it after PROMPT, with vLLM's prefix cache on, so the tokens of its last
# block are computed in the same split everywhere (on top of the 896 cached ones) and their
# KV is bit for bit the same: only then can greedy tokens be compared exactly (a different
# split rounds differently in bf16 and may flip a near-tie).
BLOCKS_PROMPT = "0:896,2000:128"
BLOCK = 128  # vLLM's CPU block size, and so the connector's chunk size
HIT = 1100 - 1  # everything but the last token, which vLLM computes
# the 8 full chunks of the prompt and its partial last chunk
CHUNKS = 1100 // BLOCK + 1
MODEL = Path(
    os.environ.get(
        "KVFS_VLLM_MODEL",
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvfs" / "smollm2-135m-hf",
    )
)
ENGINE = Path(__file__).with_name("vllm_engine.py")
LOGPROB_TOLERANCE = 0.1
# vLLM CPU reserves one more core for the engine process when a KV connector is configured,
# which changes the compute threads, the float summation order and so greedy tokens: every
# engine here reserves exactly one, so all compute alike.
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}

try:
    import kvfs  # noqa: F401
    import vllm  # noqa: F401

    _missing = ""
except ImportError as e:
    _missing = f"kvfs or vllm is not importable ({e}); run scripts/install-vllm"


def kv_config(path: Path) -> dict:
    return {
        "kv_connector": "KvfsConnector",
        "kv_connector_module_path": "kvfs.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"kvfs_path": str(path)},
    }


def run_engines(
    logs: Path, name: str, kv: dict | None, prompts: tuple[str, ...] = (PROMPT,)
) -> tuple[list[dict], str]:
    """Runs vllm_engine.py in a fresh process on `prompts`, one after the other; returns its
    results and its log."""
    out = logs / f"{name}.json"
    cmd = [sys.executable, str(ENGINE), "--model", str(MODEL), "--text", str(TEXT)]
    for p in prompts:
        cmd += ["--prompt", p]
    cmd += ["--max-tokens", "32", "--out", str(out)]
    if kv is not None:
        cmd += ["--kv", json.dumps(kv)]
    env = dict(os.environ, **ENGINE_ENV)
    log = logs / f"{name}.log"
    with log.open("w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=1200).returncode
    text = log.read_text()
    assert rc == 0, f"engine {name} failed ({rc}):\n{text[-4000:]}"
    return json.loads(out.read_text())["results"], text


def run_engine(logs: Path, name: str, kv: dict | None) -> tuple[dict, str]:
    """`run_engines` of PROMPT alone: its one result and the log."""
    results, text = run_engines(logs, name, kv)
    return results[0], text


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    need("vllm", not _missing, _missing)
    need("model", (MODEL / "config.json").exists(), f"no converted model at {MODEL} (scripts/install-vllm)")
    need("vllm", TEXT.exists(), f"{TEXT} (Debian base-files) is missing")
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def baselines(logs: Path) -> list[dict]:
    """PROMPT and BLOCKS_PROMPT in an engine without a connector."""
    results, _ = run_engines(logs, "baseline", None, (PROMPT, BLOCKS_PROMPT))
    assert [len(r["tokens"]) for r in results] == [32, 32]
    return results


@pytest.fixture(scope="module")
def baseline(baselines: list[dict]) -> dict:
    return baselines[0]


@pytest.fixture(scope="module")
def s3(logs: Path):
    """An S3 endpoint and a fresh prefix: Garage (KVFS_TEST_S3_ENDPOINT) or examples/s3_server."""
    with s3_endpoint() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def host_a(logs: Path, s3):
    ok, why = fuse_ok()
    need("fuse", ok, why)
    config = s3_config(logs / "a.toml", s3) if s3 else None
    m = Mount(logs / "cache-a", logs / "mnt-a", config)
    yield m
    m.stop()


def chunk_files(mnt: Path) -> list[Path]:
    return sorted(p for p in mnt.glob("*/*.kvc"))


def test_engine_stores_then_a_fresh_engine_reuses_through_a_mount(logs, baselines, host_a) -> None:
    baseline, whole_blocks = baselines
    (first, other), log = run_engines(
        logs, "engine1", kv_config(host_a.dir), (PROMPT, BLOCKS_PROMPT)
    )
    assert first["num_cached_tokens"] == 0
    assert first["tokens"] == baseline["tokens"]
    # the shared 7 blocks come from vLLM's own prefix cache; kvfs has nothing beyond them
    assert other["num_cached_tokens"] == 896 == whole_blocks["num_cached_tokens"]
    assert other["tokens"] == whole_blocks["tokens"]
    files = chunk_files(host_a.dir)
    # every full 128-token chunk of the 1,100-token prompt, its partial last chunk, and the
    # last chunk of the 1,024-token one
    assert len(files) == CHUNKS + 1, (files, log[-3000:])

    (second, third), log = run_engines(
        logs, "engine2", kv_config(host_a.dir), (PROMPT, BLOCKS_PROMPT)
    )
    assert second["num_cached_tokens"] == HIT, log[-3000:]
    assert second["tokens"] == baseline["tokens"]
    assert abs(second["first_logprob"] - baseline["first_logprob"]) <= LOGPROB_TOLERANCE
    # 1,024 tokens: vLLM's prefix cache has 7 blocks of them (a local hit stops before the
    # last token's block), kvfs the first 127 tokens of the 8th (a full chunk)
    assert third["num_cached_tokens"] == 1024 - 1, log[-3000:]
    assert third["tokens"] == whole_blocks["tokens"]
    assert abs(third["first_logprob"] - whole_blocks["first_logprob"]) <= LOGPROB_TOLERANCE
    assert "kvfs: load of request" not in log
    # nothing new was stored: every chunk came from kvfs
    assert len(chunk_files(host_a.dir)) == CHUNKS + 1


def test_host_b_with_an_empty_cache_gets_the_hit_through_s3(logs, baseline, host_a, s3) -> None:
    need("s3", s3 is not None, "no S3 server: set KVFS_TEST_S3_ENDPOINT or build examples/s3_server")
    assert chunk_files(host_a.dir), "engine 1 stored nothing (the test above failed)"
    m = Mount(logs / "cache-b", logs / "mnt-b", s3_config(logs / "b.toml", s3))
    try:
        assert not list((logs / "cache-b").rglob("*.kvc")), "host B's cache starts empty"
        result, log = run_engine(logs, "hostb", kv_config(m.dir))
        assert result["num_cached_tokens"] == HIT, log[-3000:]
        assert result["tokens"] == baseline["tokens"]
        assert abs(result["first_logprob"] - baseline["first_logprob"]) <= LOGPROB_TOLERANCE
        # the chunks came from the bucket into host B's cache
        assert len(list((logs / "cache-b").rglob("*.kvc"))) == CHUNKS
    finally:
        m.stop()


def first_chunk(cache: Path, files: list[Path]) -> Path:
    """The prompt's first chunk among `files` (the one without a parent), by `kvfs stat`."""
    for f in files:
        out = subprocess.run(
            [str(kvfs_bin()), "--cache-dir", str(cache), "stat", f"{f.parent.name}/{f.stem}"],
            capture_output=True, text=True, check=True,
        ).stdout
        parent = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("parent:"))
        if parent in ("none", "-", "0" * 64):
            return f
    raise AssertionError(f"no chunk without a parent among {files}")


def test_a_corrupt_chunk_is_recomputed_with_the_same_tokens(logs, baseline, host_a) -> None:
    files = chunk_files(host_a.dir)
    assert files, "engine 1 stored nothing (the first test failed)"
    # Flip one payload byte of the prompt's first chunk in the cache directory behind the mount
    # (the file the loader reads), as a bad disk would. The whole prompt is then recomputed in
    # one prefill, as without kvfs, so the greedy tokens must be the same bit for bit. (After a
    # failure in a later chunk vLLM recomputes only from there; a different split of the same
    # prefill rounds differently in bf16 and may flip a near-tie: this prompt's 4th token is
    # one. The valid prefix of a partial failure is checked in test_loader.py.)
    bad = first_chunk(logs / "cache-a", files)
    backing = Path(os.getxattr(bad, "user.kvfs.backing").decode())
    data = bytearray(backing.read_bytes())
    data[len(data) // 2] ^= 0x10
    backing.write_bytes(bytes(data))
    result, log = run_engine(logs, "corrupt", kv_config(host_a.dir))
    assert "kvfs: load of request" in log and "will be recomputed" in log, log[-3000:]
    assert f"{-(-HIT // BLOCK)} blocks will be recomputed" in log, log[-3000:]
    assert result["tokens"] == baseline["tokens"]
    assert abs(result["first_logprob"] - baseline["first_logprob"]) <= LOGPROB_TOLERANCE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def metric(text: str, name: str) -> float:
    """The sum of the samples of `name` (any labels) in a Prometheus exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_openai_server_answers_the_second_request_from_kvfs(logs) -> None:
    store = logs / "server-dir"
    store.mkdir()
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL)]
    cmd += ["--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "4096", "--seed", "0"]
    # vLLM's own prefix cache off: a cached token can only come from kvfs
    cmd += ["--no-enable-prefix-caching", "--enable-prompt-tokens-details"]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--kv-transfer-config", json.dumps(kv_config(store))]
    log = (logs / "server.log").open("w")
    proc = subprocess.Popen(
        cmd, env=dict(os.environ, **ENGINE_ENV), stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None, (logs / "server.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server not ready in 900 s"
            time.sleep(1)
        prompt = TEXT.read_text()[:5000]  # about 1,100 tokens
        body = {"model": str(MODEL), "prompt": prompt, "max_tokens": 16, "temperature": 0}
        first = post(base + "/v1/completions", body)
        second = post(base + "/v1/completions", body)
        cached = lambda r: ((r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)  # noqa: E731
        assert cached(first) == 0
        n = first["usage"]["prompt_tokens"]
        assert cached(second) == n - 1, second["usage"]
        assert second["choices"][0]["text"] == first["choices"][0]["text"]
        # The connector's figures reach vLLM's own /metrics (kvfs.vllm_stats): the second
        # request's hit and its load. Stats arrive with the engine's step outputs: poll briefly.
        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
                text = r.read().decode()
            hit, loads = metric(text, "vllm:kvfs_hit_tokens_total"), metric(text, "vllm:kvfs_loads_total")
            if (hit >= cached(second) and loads >= 1) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert hit >= cached(second) and loads >= 1, [ln for ln in text.splitlines() if "kvfs" in ln]
        assert metric(text, "vllm:kvfs_load_seconds_count") >= 1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
