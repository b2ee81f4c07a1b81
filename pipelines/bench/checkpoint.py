"""`mova bench checkpoint`: fetching a checkpoint with one multi-GiB shard from S3 on one node.

A tiny MoVA gets an extra LLM weights file of ``size_mib`` (one safetensors tensor), is
published to an S3 endpoint (a moto server on loopback unless ``AWS_ENDPOINT_URL_S3`` points
elsewhere), and then ``processes`` fresh processes of one node ask for the LLM part at the same
moment, as the LLM replicas of a node would; one more process asks for one expert only, as an
expert replica would. Each process reports its resting memory, its peak while fetching
(sampled every 10 ms) and what it fetched; the same object is also downloaded with a plain
boto3 ``download_file`` (same number of parallel ranged reads) for the throughput ratio.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import boto3
import torch
from boto3.s3.transfer import TransferConfig
from safetensors.torch import save_file

from mova.checkpoint import write_file_list
from mova.factory import build_tiny_mova
from pipelines.bench.harness import machine_info
from pipelines.common.checkpoint_store import FETCHED, local_checkpoint, part_files, publish
from pipelines.common.ray_init import free_local_port
from pipelines.common.transfer import THREADS

log = logging.getLogger(__name__)

BUCKET = "mova-bench"
BIG = "llm/extra-weights.safetensors"
EXPERT = "sam"


@dataclass
class ProcessFetch:
    parts: str
    rest_mib: float
    peak_mib: float
    files: int
    bytes: int
    seconds: float
    weights: list[str]


@dataclass
class CheckpointBenchResult:
    size_mib: int
    processes: int
    needed_bytes: int = 0  # what the LLM part needs (its files and the configs)
    fetches: list[ProcessFetch] = field(default_factory=list)
    publish_s: float = 0.0
    publish_peak_mib: float = 0.0
    boto3_s: float = 0.0
    machine: dict[str, str] = field(default_factory=dict)
    key: str = "bench:checkpoint"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def fetch_s(self) -> float:
        return max(f.seconds for f in self.fetches if f.parts == "llm")

    @property
    def node_bytes(self) -> int:
        """What the LLM node's processes fetched from S3, together."""
        return sum(f.bytes for f in self.fetches if f.parts == "llm")


def _rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Sampler:
    """This process's resting memory, and its peak while the ``with`` block runs (sampled
    every 10 ms), in MiB; ``seconds`` the block's duration."""

    def __enter__(self) -> Sampler:
        self.rest = self.peak = _rss_mib()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._began = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.01):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._began
        self._done.set()
        self._thread.join()


def _fetch_child(uri: str, parts: str, start_at: float, out: Any) -> None:
    """One replica-like process: rest, then fetch ``parts`` at ``start_at`` while sampling."""
    time.sleep(max(0.0, start_at - time.time()))
    with Sampler() as sampled:
        local = Path(local_checkpoint(uri, parts=[parts]))
    weights = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.safetensors"))
    out.put(asdict(ProcessFetch(parts, sampled.rest, sampled.peak, FETCHED["files"],
                                FETCHED["bytes"], sampled.seconds, weights)))


def _moto(root: Path) -> tuple[subprocess.Popen | None, str]:
    """The S3 endpoint: the environment's, else a moto server on loopback (started here)."""
    if os.environ.get("AWS_ENDPOINT_URL_S3"):
        return None, os.environ["AWS_ENDPOINT_URL_S3"]
    port = free_local_port()
    log_file = open(root / "moto.log", "wb")  # noqa: SIM115 (closed with the server)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H",
                             "127.0.0.1", "-p", str(port)], stdout=log_file,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ENDPOINT_URL_S3": url, "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    deadline = time.monotonic() + 30
    while True:
        try:
            boto3.client("s3").list_buckets()
            return proc, url
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"moto_server did not start; see {root / 'moto.log'}"
                                   ) from None
            time.sleep(0.3)


def _checkpoint(root: Path, size_mib: int) -> Path:
    """A tiny MoVA with one extra ``size_mib`` MiB LLM weights file (an fp16 tensor)."""
    folder = root / "ckpt"
    build_tiny_mova(seed=0, experts=["dinov2", EXPERT]).save_pretrained(folder)
    big = torch.zeros(size_mib * (1 << 20) // 2, dtype=torch.float16)
    big.view(torch.int16).random_()
    save_file({"extra": big}, str(folder / BIG))
    del big
    write_file_list(folder)
    return folder


def bench_checkpoint(workdir: str | Path, *, size_mib: int = 1536, processes: int = 4
                     ) -> CheckpointBenchResult:
    """Publish, then fetch from ``processes`` processes at once (see the module)."""
    root = Path(workdir)
    result = CheckpointBenchResult(size_mib=size_mib, processes=processes,
                                   machine=machine_info(torch.device("cpu")))
    server, _ = _moto(root)
    try:
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        folder = _checkpoint(root, size_mib)
        listing = json.loads((folder / "files.json").read_text())["files"]
        components = json.loads((folder / "components.json").read_text())
        result.needed_bytes = sum(listing[n]["bytes"]
                                  for n in part_files(listing, components, ["llm"]))
        uri = f"s3://{BUCKET}/ckpt"
        with Sampler() as sampled:
            publish(folder, uri)
        result.publish_s = sampled.seconds
        result.publish_peak_mib = sampled.peak - sampled.rest
        _run_fetches(result, uri, root, processes)
        target = root / "boto3.bin"
        began = time.perf_counter()
        s3.download_file(BUCKET, f"ckpt/{BIG}", str(target),
                         Config=TransferConfig(max_concurrency=THREADS))
        result.boto3_s = time.perf_counter() - began
        target.unlink()
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    return result


def _run_fetches(result: CheckpointBenchResult, uri: str, root: Path, processes: int) -> None:
    """``processes`` LLM fetchers on one node (one cache), then an expert replica on another."""
    ctx = multiprocessing.get_context("spawn")
    for node, kinds in (("node-llm", ["llm"] * processes), ("node-expert", [f"expert:{EXPERT}"])):
        os.environ["MOVA_CACHE"] = str(root / node)  # inherited by the spawned children
        out = ctx.Queue()
        start_at = time.time() + 15  # every child imported and resting by then
        children = [ctx.Process(target=_fetch_child, args=(uri, k, start_at, out))
                    for k in kinds]
        for child in children:
            child.start()
        for _ in children:
            record = out.get(timeout=3600)
            result.fetches.append(ProcessFetch(**record))
        for child in children:
            child.join(timeout=60)
        shutil.rmtree(root / node, ignore_errors=True)
