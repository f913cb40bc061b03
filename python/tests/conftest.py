"""Shared helpers of the Python tests: the KVFS_REQUIRE convention, the model, the mount.

A test that needs something this machine may lack calls `need(name, ok, why)`: it skips with
the reason (pytest -rs prints it) unless KVFS_REQUIRE names `name` (or `all`), and then it
fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]


def required(name: str) -> bool:
    names = {n.strip() for n in os.environ.get("KVFS_REQUIRE", "").split(",")}
    return "all" in names or name in names


def need(name: str, ok: bool, why: str) -> None:
    if ok:
        return
    if required(name):
        pytest.fail(f"KVFS_REQUIRE includes {name}: {why}")
    pytest.skip(why)


def kvfs_bin() -> Path:
    """The kvfs CLI cargo built (KVFS_BIN overrides)."""
    return Path(os.environ.get("KVFS_BIN", REPO / "target" / "debug" / "kvfs"))


class Mount:
    """`kvfs --cache-dir CACHE mount DIR`, ready once `/.kvfs/mount.json` exists; unmounted
    and reaped by `stop()`."""

    def __init__(self, cache: Path, dir: Path, config: Path | None = None):
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        cmd = [str(kvfs_bin())]
        if config is not None:
            cmd += ["--config", str(config)]
        cmd += ["--cache-dir", str(cache), "mount", str(dir)]
        env = dict(os.environ, KVFS_LOG="info")
        # the daemon's log beside its cache (a pipe nobody reads would block it when full)
        self.log = cache.parent / f"{cache.name}.mount.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        ready = dir / ".kvfs" / "mount.json"
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvfs mount exited: {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("kvfs mount did not come up in 30 s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            subprocess.run([str(kvfs_bin()), "umount", str(self.dir)], capture_output=True)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def fuse_ok() -> tuple[bool, str]:
    if not os.path.exists("/dev/fuse"):
        return False, "no /dev/fuse"
    if not kvfs_bin().exists():
        return False, f"{kvfs_bin()} is not built (cargo build)"
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None and os.geteuid() != 0:
        return False, "no fusermount and not root"
    return True, ""


@contextlib.contextmanager
def s3_endpoint() -> Iterator[dict | None]:
    """An S3 endpoint and a fresh key prefix: Garage from KVFS_TEST_S3_ENDPOINT (CI), else the
    in-process server `target/debug/examples/s3_server` (stopped on exit), else None."""
    prefix = f"vllm-{uuid.uuid4().hex[:12]}"
    if os.environ.get("KVFS_TEST_S3_ENDPOINT"):
        yield {
            "endpoint": os.environ["KVFS_TEST_S3_ENDPOINT"],
            "bucket": os.environ["KVFS_TEST_S3_BUCKET"],
            "region": os.environ.get("AWS_REGION", "garage"),
            "key": os.environ["AWS_ACCESS_KEY_ID"],
            "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
            "prefix": prefix,
        }
        return
    server = REPO / "target" / "debug" / "examples" / "s3_server"
    if not server.exists():
        yield None
        return
    proc = subprocess.Popen([str(server)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    fields = dict(f.split("=", 1) for f in line)
    try:
        yield {
            "endpoint": fields["KVFS_TEST_S3_ENDPOINT"],
            "bucket": fields["bucket"],
            "region": "us-east-1",
            "key": fields["key"],
            "secret": fields["secret"],
            "prefix": prefix,
        }
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def s3_config(path: Path, s3: dict, write_through: bool = True) -> Path:
    """A kvfs config whose [s3] table points at the server. With `write_through`, uploads
    finish before a put returns, so another host sees a chunk as soon as the engine that
    stored it is done; without, they are queued (`kvfs sync push` drains the queue)."""
    path.write_text(
        f'[s3]\nurl = "s3://{s3["bucket"]}/{s3["prefix"]}"\nendpoint = "{s3["endpoint"]}"\n'
        f'region = "{s3["region"]}"\naccess_key_id = "{s3["key"]}"\n'
        f'secret_access_key = "{s3["secret"]}"\nwrite_through = {str(write_through).lower()}\n'
    )
    return path
