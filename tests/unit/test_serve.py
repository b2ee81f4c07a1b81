"""The serving layer without Ray running: request parsing, image sources,
error mapping, the recipe and the Serve config file."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipelines.common.recipe import load_recipe
from pipelines.serve.app import deployment_table
from pipelines.serve.errors import APIError, RequestError, to_api_error
from pipelines.serve.openai_request import ChatRequest, parse_chat_request, to_conversation
from pipelines.serve.recipe import ServeRecipe
from pipelines.serve.sources import classify, decode_image, image_bytes

JOBS = Path(__file__).resolve().parents[2] / "jobs" / "serve.yaml"


def _uri(fmt="PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 200, 30)).save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _body(**extra):
    content = [{"type": "text", "text": "What?"},
               {"type": "image_url", "image_url": {"url": _uri()}}]
    return {"model": "mova", "messages": [{"role": "user", "content": content}], **extra}


@pytest.mark.parametrize("extra, param", [
    ({"temperature": 3}, "temperature"), ({"stream": 0}, "stream"), ({"n": 2}, "n"),
    ({"max_tokens": 0}, "max_tokens"), ({"stop": ["a"] * 5}, "stop"), ({"stop": [""]}, "stop"),
    ({"mova": {"experts": "sam"}}, "mova.experts"), ({"top_p": 0}, "top_p"),
    ({"messages": []}, "messages"), ({"tools": [{"type": "function"}]}, "tools"),
])
def test_bad_parameters_are_400_naming_the_field(extra, param):
    with pytest.raises(APIError) as info:
        parse_chat_request(_body(**extra))
    assert info.value.status == 400 and info.value.param == param


def test_messages_become_turns_with_one_image():
    body = _body()
    body["messages"] = [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hello"},
                        {"role": "assistant", "content": [{"type": "text", "text": "Hi!"}]},
                        body["messages"][0]]
    conv = to_conversation(parse_chat_request(body).messages, max_images=1)
    assert [t["from"] for t in conv.turns] == ["system", "human", "gpt", "human"]
    assert conv.questions == ["Hello", "What?"] and conv.image_url.startswith("data:image/png")
    assert conv.image_param == "messages.3.content.1.image_url"
    two = _body()
    two["messages"][0]["content"].append(two["messages"][0]["content"][1])
    for body, code in ((two, "too_many_images"),
                       ({**_body(), "messages": [{"role": "user", "content": "x"}]},
                        "missing_image")):
        with pytest.raises(APIError, match="image") as info:
            to_conversation(parse_chat_request(body).messages, max_images=1)
        assert info.value.code == code


@pytest.mark.parametrize("roles, param, words", [
    (["assistant", "user"], "messages.0.role", "expected a 'user' message, got 'assistant'"),
    (["user", "user"], "messages.1.role", "expected a 'assistant' message, got 'user'"),
    (["user", "system", "user"], "messages.1.role", "may only come first"),
    (["system"], "messages", "only a system message"),
    (["user", "assistant"], "messages", "the last message must be a user message"),
])
def test_message_order_errors_speak_openai_roles(roles, param, words):
    body = _body()
    image = body["messages"][0]
    body["messages"] = [image if role == "user" else {"role": role, "content": "x"}
                        for role in roles]
    with pytest.raises(APIError) as info:
        to_conversation(parse_chat_request(body).messages, max_images=1)
    assert info.value.status == 400 and info.value.param == param
    assert words in info.value.message
    assert "human" not in info.value.message and "gpt" not in info.value.message


@pytest.mark.parametrize("part, param", [
    ({"type": "image_url", "image_url": {"url": "x", "colour": "red"}},
     "messages.0.content.1.image_url.colour"),
    ({"type": "text", "text": "x", "lang": "en"}, "messages.0.content.1.lang"),
    ({"type": "image_url", "image_url": {"url": "x", "detail": "huge"}},
     "messages.0.content.1.image_url.detail"),
])
def test_unknown_fields_inside_message_parts_are_400(part, param):
    body = _body()
    body["messages"][0]["content"][1] = part
    with pytest.raises(APIError) as info:
        parse_chat_request(body)
    assert info.value.status == 400 and info.value.param == param
    assert info.value.message.startswith(param + ": ")
    body = _body()
    body["messages"][0]["tool_calls"] = []
    with pytest.raises(APIError, match="tool_calls"):
        parse_chat_request(body)
    replayed = _body()
    replayed["messages"][:0] = [{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Yo", "refusal": None}]
    assert len(parse_chat_request(replayed).messages) == 3


def test_the_schema_requires_a_user_message_with_an_image():
    jsonschema = pytest.importorskip("jsonschema")
    schema = ChatRequest.model_json_schema()
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid(_body())
    text_only = {**_body(), "messages": [{"role": "user", "content": "x"}]}
    assert not validator.is_valid(text_only)
    image_in_assistant = {**_body(), "messages": [
        {"role": "assistant", "content": _body()["messages"][0]["content"]},
        {"role": "user", "content": "x"}]}
    assert not validator.is_valid(image_in_assistant)


def test_image_sources_policy(tmp_path):
    data = image_bytes(_uri(), max_bytes=10**6, allowed_dirs=[])
    assert decode_image(data).size == (32, 24)
    allowed = tmp_path / "ok"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(data)
    (tmp_path / "b.png").write_bytes(data)
    assert image_bytes(f"file://{allowed / 'a.png'}", max_bytes=10**6,
                       allowed_dirs=[str(allowed)]) == data
    cases = [(str(allowed / ".." / "b.png"), "image_not_allowed"),
             (str(tmp_path / "b.png"), "image_not_allowed"),
             ("https://example.com/a.png", "image_not_allowed"),
             ("data:image/png;base64,@@@", "invalid_image"),
             (_uri(), "image_too_large")]
    for url, code in cases:
        with pytest.raises(APIError) as info:
            image_bytes(url, max_bytes=100, allowed_dirs=[str(allowed)])
        assert info.value.status == 400 and info.value.code == code, url
    with pytest.raises(APIError, match="scheme 'ftp'"):
        classify("ftp://x/y.png")
    with pytest.raises(APIError) as info:
        decode_image(b"not an image")
    assert info.value.code == "invalid_image"


def test_failures_map_to_statuses():
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    class Wrapped(Exception):  # how a replica's exception arrives (RayTaskError.cause)
        cause = RequestError("prompt too long", param="messages", code="context_length_exceeded")

    assert to_api_error(BackPressureError(5, 4)).status == 503
    assert to_api_error(ActorDiedError()).status == 503
    assert to_api_error(TimeoutError(), timeout_s=2).status == 408
    err = to_api_error(Wrapped())
    assert (err.status, err.param, err.code) == (400, "messages", "context_length_exceeded")
    assert to_api_error(KeyError("x")).body()["error"]["code"] == "internal_error"
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_serve_recipe_and_serve_config(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from mova.factory import build_tiny_mova
    from pipelines.serve.app import check_cpu_budget, serve_config

    ckpt = tmp_path / "ckpt"
    build_tiny_mova(seed=0, experts=["sam", "vary"]).save_pretrained(ckpt)
    recipe = load_recipe(ServeRecipe, JOBS, [f"checkpoint={ckpt}", "port=8123",
                                              "experts.overrides={vary: {num_cpus: 0.2}}"])
    config = serve_config(recipe)
    ServeDeploySchema.model_validate(config)
    assert config["http_options"]["port"] == 8123
    app = config["applications"][0]
    assert app["import_path"] == "pipelines.serve.app:build_app"
    assert app["args"]["checkpoint"] == str(ckpt.resolve())
    opts = {d["name"]: d for d in app["deployments"]}
    assert set(opts) == {"Ingress", "Adapter", "LLM", "Expert_sam", "Expert_vary"}
    assert opts["Expert_vary"]["ray_actor_options"]["num_cpus"] == 0.2
    assert opts["Expert_sam"]["autoscaling_config"]["min_replicas"] == 0
    assert opts["LLM"]["user_config"]["max_batch_size"] == 16
    assert yaml.safe_load(yaml.safe_dump(config)) == config
    check_cpu_budget(recipe, ["sam", "vary"], 2)
    with pytest.raises(ValueError, match="need 0.6 CPUs"):
        check_cpu_budget(recipe, ["sam", "vary"], 0.5)
    with pytest.raises(ValueError, match="not in the checkpoint's pool"):
        serve_config(load_recipe(ServeRecipe, JOBS, [f"checkpoint={ckpt}",
                                                     "experts.overrides={dino: {}}"]))


@pytest.mark.parametrize("override, match", [
    ("checkpoint=", "checkpoint must be set"),
    ("device=tpu", "device='tpu'"),
    ("experts.default.autoscaling.max_replicas=0", "max_replicas"),
    ("llm.max_ongoing_requests=8", "2 \\* llm.max_batch_size"),
    ("limits.max_images=2", "max_images must be 1"),
    ("experts.overrides={sam: {num_cpu: 1}}", "unknown config key.*num_cpu"),
    ("adapter.max_queued_requests=0", "max_queued_requests"),
])
def test_serve_recipe_errors_name_the_field(override, match):
    overrides = [] if override.startswith("checkpoint") else ["checkpoint=x"]
    with pytest.raises(ValueError, match=match):
        load_recipe(ServeRecipe, JOBS, [*overrides, override])


def test_app_args_name_a_recipe_file_as_a_rayservice_does(tmp_path, monkeypatch):
    from pipelines.serve.app import recipe_from_args

    monkeypatch.chdir(JOBS.parent.parent)  # the working_dir a RayService runs in
    recipe = recipe_from_args({"config": "jobs/serve.yaml", "checkpoint": "ckpt",
                               "llm": {"max_batch_size": 4},
                               "overrides": ["port=9001", "adapter.num_cpus=0.5"]})
    defaults = load_recipe(ServeRecipe, JOBS, ["checkpoint=ckpt"])
    assert (recipe.checkpoint, recipe.port, recipe.adapter.num_cpus) == ("ckpt", 9001, 0.5)
    assert recipe.llm.max_batch_size == 4
    assert recipe.llm.max_ongoing_requests == defaults.llm.max_ongoing_requests  # merged
    assert recipe_from_args({"checkpoint": "ckpt"}).checkpoint == "ckpt"
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        recipe_from_args({"config": "jobs/nope.yaml"})
    with pytest.raises(ValueError, match="overrides"):
        recipe_from_args({"config": "jobs/serve.yaml", "overrides": "port=1"})
    with pytest.raises(ValueError, match="unknown config key.*prot"):
        recipe_from_args({"config": "jobs/serve.yaml", "checkpoint": "c", "prot": 1})


def test_metrics_view_keeps_only_our_families():
    from prometheus_client.parser import text_string_to_metric_families

    from pipelines.serve.metrics import filter_families

    text = """# HELP ray_mova_requests_total Chat completion requests by HTTP status
# TYPE ray_mova_requests_total counter
ray_mova_requests_total{status="200",Version="2.60.0"} 3.0
ray_mova_requests_total{status="503",Version="2.60.0"} 1.0
# HELP ray_node_cpu_utilization Total CPU usage
# TYPE ray_node_cpu_utilization gauge
ray_node_cpu_utilization{ip="127.0.0.1"} 12.5
# HELP ray_mova_step_seconds Duration of one batch
# TYPE ray_mova_step_seconds histogram
ray_mova_step_seconds_bucket{stage="decode",le="0.1"} 2.0
ray_mova_step_seconds_bucket{stage="decode",le="+Inf"} 3.0
ray_mova_step_seconds_count{stage="decode"} 3.0
ray_mova_step_seconds_sum{stage="decode"} 0.42
"""
    kept = filter_families(text)
    families = {f.name: f for f in text_string_to_metric_families(kept)}
    assert set(families) == {"ray_mova_requests", "ray_mova_step_seconds"}
    requests = {s.labels["status"]: s.value for s in families["ray_mova_requests"].samples}
    assert requests == {"200": 3.0, "503": 1.0}
    steps = {(s.name, s.labels.get("le")): s.value
             for s in families["ray_mova_step_seconds"].samples}
    assert steps[("ray_mova_step_seconds_sum", None)] == 0.42
    assert steps[("ray_mova_step_seconds_bucket", "+Inf")] == 3.0
    assert "cpu_utilization" not in kept and filter_families("") == ""


def test_a_stopped_replica_drains_what_it_holds():
    """Serve stops a replica (scale-down, redeploy) only after its requests end: it waits up
    to the request deadline plus the watchdog's grace, not Serve's default few seconds."""
    recipe = load_recipe(ServeRecipe, JOBS, ["checkpoint=/nowhere", "limits.request_timeout_s=45",
                                             "limits.stall_grace_s=7"])
    table = deployment_table(recipe, ["sam", "dinov2"])
    assert set(table) == {"Ingress", "Adapter", "LLM", "Expert_sam", "Expert_dinov2"}
    assert {o["graceful_shutdown_timeout_s"] for o in table.values()} == {52.0}
