"""vLLM on a CUDA GPU with the kvfs connector on GPU KV tensors: run by `scripts/gpu-check`
(not by pytest) when the GPU machine has a Python with CUDA vLLM (`KVFS_GPU_VLLM_PYTHON`) and
the converted SmolLM2 model (`KVFS_VLLM_MODEL`).

Three fresh engines (python/tests/vllm_engine.py) on the same 1,100-token prompt of real
English text (GPL-3 from Debian's base-files): a baseline without a connector, one that
stores through kvfs, and a fresh one that loads. Passes when the third reports the stored
tokens as cached and generates the baseline's 32 greedy tokens. Exit 0 passed, 1 failed,
3 skipped (nothing to run with).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT = "/usr/share/common-licenses/GPL-3"
PROMPT = "0:1100"
CHUNK = 256


def main() -> int:
    py = os.environ.get("KVFS_GPU_VLLM_PYTHON")
    model = os.environ.get("KVFS_VLLM_MODEL")
    if not py or not model or not Path(model).is_dir() or not Path(TEXT).exists():
        print("skipped: set KVFS_GPU_VLLM_PYTHON (a Python with CUDA vLLM and kvfs) and "
              f"KVFS_VLLM_MODEL (the converted model), and have {TEXT}")
        return 3
    work = Path(tempfile.mkdtemp(dir=os.environ.get("KVFS_GDS_TEST_DIR", ".")))
    kv = {
        "kv_connector": "KvfsConnector",
        "kv_connector_module_path": "kvfs.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "kvfs_path": str(work / "cache"),
            "kvfs_chunk_tokens": CHUNK,
            "kvfs_verify": os.environ.get("KVFS_GPU_VLLM_VERIFY", "header"),
        },
    }
    (work / "cache").mkdir()

    def engine(name: str, with_kv: bool) -> dict:
        out = work / f"{name}.json"
        cmd = [py, str(HERE / "vllm_engine.py"), "--model", model, "--text", TEXT,
               "--prompt", PROMPT, "--out", str(out)]
        if with_kv:
            cmd += ["--kv", json.dumps(kv)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        (work / f"{name}.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            raise SystemExit(f"engine {name} failed:\n{(r.stdout + r.stderr)[-4000:]}")
        return json.loads(out.read_text())["results"][0]

    base = engine("baseline", False)
    store = engine("store", True)
    reuse = engine("reuse", True)
    want_cached = (1100 - 1) // CHUNK * CHUNK
    ok = reuse["num_cached_tokens"] >= want_cached and reuse["tokens"] == base["tokens"]
    print(f"vLLM CUDA + kvfs: store run cached {store['num_cached_tokens']}, reuse run cached "
          f"{reuse['num_cached_tokens']} (want >= {want_cached}); tokens "
          f"{'equal' if reuse['tokens'] == base['tokens'] else 'DIFFERENT'} to the baseline; "
          f"TTFT-ish {base['seconds']:.3f} s baseline vs {reuse['seconds']:.3f} s reuse")
    print("vLLM CUDA check:", "passed" if ok else "FAILED", f"(logs in {work})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
