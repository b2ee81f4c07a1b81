"""`mova bench serve --overload`: the Serve app past its capacity, admission control on vs off.

The tiny model's app (2 ingress replicas, one replica per model deployment) on a local Ray
with 2 CPU hogs beside it (what else runs on the machine), 4 closed-loop clients to let the
app measure its pace, then 16 for the measured window. Each client's requests mix deadlines
(4 s or 20 s), answer lengths (4/16/32 tokens), streaming (40%) and forced experts (50%); told
503 it waits what Retry-After says (at most 5 s), as the openai client would. The same load
runs with admission control on (the default) and off (`limits.admission=false`: everything is
queued until ``max_inflight``). Counted per mode: 200s, 503s, 408s, errors mid-stream,
requests that ended past their deadline, refusals slower than 2 s, answers per second
(goodput) and the 200s' latency; replica actors stopped during the load. The app's
metrics are scraped meanwhile from the node's Ray metrics agent, as Prometheus would, and
drawn (:mod:`pipelines.bench.serve_scrape`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import ray
import torch
from PIL import Image
from ray import serve
from ray._private.state import actors

from mova.factory import build_tiny_mova
from pipelines.bench.harness import machine_info, markdown_table
from pipelines.bench.serve_scrape import Scraper, log_to_mlflow, plot, series
from pipelines.common.ray_init import free_local_port, init_ray
from pipelines.common.recipe import load_recipe
from pipelines.serve.app import start
from pipelines.serve.metrics import node_metrics_url
from pipelines.serve.recipe import ServeRecipe

log = logging.getLogger(__name__)

POOL = ["dinov2", "sam"]
CLIENTS, WARM_CLIENTS, HOGS = 16, 4, 2
REFUSE_WITHIN_S = 2.0
START_SPREAD_S = 2.0  # the clients' first requests spread over this long (not one herd)
PLOT = Path("docs/img/serving-metrics.png")


@dataclass
class ModeResult:
    mode: str
    seconds: float
    records: list[tuple[str, float, float]] = field(default_factory=list)  # status, s, deadline
    stopped_replicas: int = 0

    def count(self, status: str) -> int:
        return sum(1 for r in self.records if r[0] == status)

    def summary(self) -> dict[str, Any]:
        ok = sorted(s for status, s, _ in self.records if status == "200")
        late = sum(1 for status, s, d in self.records if status != "503" and s > d)
        slow_refusals = sum(1 for status, s, _ in self.records
                            if status == "503" and s > REFUSE_WITHIN_S)
        known = {"200", "503", "408", "stream_error", "400"}
        return {"requests": len(self.records), "ok": len(ok), "refused": self.count("503"),
                "timed_out": self.count("408"), "stream_errors": self.count("stream_error"),
                "other": sum(1 for r in self.records if r[0] not in known),
                "past_deadline": late, "slow_refusals": slow_refusals,
                "goodput_per_s": round(len(ok) / self.seconds, 3),
                "ok_p50_s": round(statistics.median(ok), 2) if ok else None,
                "ok_p95_s": round(ok[int(0.95 * (len(ok) - 1))], 2) if ok else None,
                "stopped_replicas": self.stopped_replicas}


@dataclass
class OverloadBenchResult:
    machine: dict[str, str]
    settings: dict[str, Any]
    modes: dict[str, dict[str, Any]] = field(default_factory=dict)
    plot: str = ""
    mlflow_run_id: str = ""
    key: str = "bench:serve:overload"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def image_uri(seed: int) -> str:
    rng = random.Random(seed)
    buf = io.BytesIO()
    Image.new("RGB", (96, 72), tuple(rng.randrange(256) for _ in range(3))).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _body(rng: random.Random, images: list[str]) -> tuple[dict, float]:
    timeout_s = rng.choice([4.0, 20.0, 20.0])
    body = {"model": "mova", "max_tokens": rng.choice([4, 16, 32]), "temperature": 0,
            "stream": rng.random() < 0.4, "mova": {"timeout_s": timeout_s},
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is in the image?"},
                {"type": "image_url", "image_url": {"url": rng.choice(images)}}]}]}
    if rng.random() < 0.5:
        body["mova"]["experts"] = rng.sample(POOL, rng.randrange(len(POOL) + 1))
    return body, timeout_s


async def _one(http: httpx.AsyncClient, body: dict) -> tuple[str, float]:
    """(status, Retry-After) of one request; a stream is read to its end."""
    if not body["stream"]:
        resp = await http.post("/v1/chat/completions", json=body)
        return str(resp.status_code), float(resp.headers.get("retry-after") or 1)
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return str(resp.status_code), float(resp.headers.get("retry-after") or 1)
        status = "200"
        async for line in resp.aiter_lines():
            if line.startswith('data: {"error"'):
                status = "stream_error"
        return status, 1.0


async def _clients(url: str, count: int, seconds: float, seed: int,
                   records: list | None) -> None:
    images = [image_uri(i) for i in range(40)]
    stop_at = time.monotonic() + seconds

    async def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        await asyncio.sleep(rng.uniform(0.0, START_SPREAD_S))
        async with httpx.AsyncClient(base_url=url, timeout=40) as http:
            while time.monotonic() < stop_at:
                body, deadline = _body(rng, images)
                start = time.monotonic()
                try:
                    status, retry = await _one(http, body)
                except httpx.HTTPError as exc:
                    status, retry = f"transport:{type(exc).__name__}", 1.0
                if records is not None:
                    records.append((status, time.monotonic() - start, deadline))
                if status == "503":
                    await asyncio.sleep(min(retry, 5.0, max(0.0, stop_at - time.monotonic())))

    await asyncio.gather(*(client(i) for i in range(count)))


def _replica_ids() -> set[str]:
    return {aid for aid, a in actors().items() if a["State"] == "ALIVE"
            and a["ActorClassName"].startswith("ServeReplica:mova:")}


def _run_mode(checkpoint: str, admission: bool, seconds: float, warm_s: float,
              seed: int, port: int) -> tuple[ModeResult, list]:
    recipe = load_recipe(ServeRecipe, None, [
        f"checkpoint={checkpoint}", f"port={port}", "llm.engine=torch",
        "limits.request_timeout_s=20",
        "limits.max_tokens=32", "limits.max_inflight=64", f"limits.admission={admission}",
        "experts.default.num_replicas=1", "experts.default.autoscaling=null",
        "ingress.num_replicas=2"])
    url = start(recipe)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(HOGS)]
    result = ModeResult("on" if admission else "off", seconds)
    try:
        asyncio.run(_clients(url, WARM_CLIENTS, warm_s, seed, None))
        before = _replica_ids()
        scraper = Scraper(node_metrics_url() or url + "/metrics", period_s=5.0)
        scraper.start()
        asyncio.run(_clients(url, CLIENTS, seconds, seed, result.records))
        samples = scraper.stop()
        result.stopped_replicas = len(before - _replica_ids())
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(timeout=10)
        serve.delete("mova")
    return result, samples


def bench_serve_overload(*, seconds: float = 30.0, warm_s: float = 10.0, seed: int = 0,
                         mlflow_uri: str | None = None,
                         plot_path: Path = PLOT) -> OverloadBenchResult:
    """Both modes on one local Ray; the plot is drawn from the admission-on run."""
    os.environ.setdefault("RAY_metrics_report_interval_ms", "5000")
    result = OverloadBenchResult(machine=machine_info(torch.device("cpu")), settings={
        "seconds": seconds, "warm_s": warm_s, "clients": CLIENTS, "hogs": HOGS, "seed": seed})
    with tempfile.TemporaryDirectory(prefix="mova-bench-overload-") as tmp:
        model = build_tiny_mova(seed=seed, experts=POOL)
        checkpoint = str(model.save_pretrained(Path(tmp) / "ckpt"))
        init_ray("local", num_cpus=os.cpu_count() or 2,
                 temp_dir=tempfile.mkdtemp(prefix="mova-bench-overload-", dir="/tmp"))
        try:
            panels, port = None, free_local_port()  # Serve's proxy keeps its first port
            for admission in (True, False):
                mode, samples = _run_mode(checkpoint, admission, seconds, warm_s, seed, port)
                result.modes[mode.mode] = mode.summary()
                panels = panels or series(samples)
                log.info("admission %s: %s", mode.mode, result.modes[mode.mode])
        finally:
            serve.shutdown()
            ray.shutdown()
    result.plot = str(plot(panels, plot_path, "mova serving metrics under overload "
                                              "(admission on; tiny model, 16 clients, 2 hogs)"))
    uri = mlflow_uri or f"sqlite:///{tempfile.gettempdir()}/mova-bench-mlflow.db"
    result.mlflow_run_id = log_to_mlflow(uri, "mova-bench", Path(result.plot), result.modes)
    return result


def render_overload(result: OverloadBenchResult) -> str:
    m = result.machine
    machine = "; ".join(f"{k}: {v}" for k, v in m.items())
    cols = ["requests", "ok", "refused", "timed_out", "stream_errors", "other", "past_deadline",
            "slow_refusals", "goodput_per_s", "ok_p50_s", "ok_p95_s", "stopped_replicas"]
    rows = [[f"admission {mode}", *(row[c] for c in cols)] for mode, row in
            result.modes.items()]
    on = result.modes.get("on", {})
    met = (on.get("timed_out") == 0 and on.get("past_deadline") == 0
           and on.get("slow_refusals") == 0 and on.get("stream_errors") == 0
           and on.get("other") == 0
           and on.get("stopped_replicas") == 0)
    s = result.settings
    return "\n".join([
        "## `mova bench serve --overload`: past capacity, admission control on vs off",
        "", "Reproduce: `mova bench serve --overload`", "", f"Machine: {machine}", "",
        f"The tiny model's app (2 ingress replicas, 1 replica per model deployment, experts "
        f"{', '.join(POOL)}) with {s['hogs']} CPU hogs beside it; {WARM_CLIENTS} clients for "
        f"{s['warm_s']:g} s, then {s['clients']} closed-loop clients for {s['seconds']:g} s "
        f"(first requests spread over {START_SPREAD_S:g} s; deadlines 4 s or 20 s, 4/16/32 "
        "tokens, 40% streamed, 50% forced experts; a 503 waits its Retry-After, at most 5 s). "
        "Latencies in seconds, at the client.", "",
        markdown_table(["mode", *cols], rows), "",
        f"Goal (admission on): no 408, nothing past its deadline, every 503 within "
        f"{REFUSE_WITHIN_S:g} s, no error mid-stream, no replica stopped: "
        f"**{'met' if met else 'missed'}**.", "",
        f"The app's `/metrics` during the admission-on run: `{result.plot}` (also in MLflow, "
        f"run `{result.mlflow_run_id}`).", ""])
