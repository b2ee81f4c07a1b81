"""Building, starting and describing the MoVA Serve application.

:func:`build_app` is the application builder: ``mova serve`` calls it, and a Serve config file
written by :func:`write_serve_config` names it (``import_path``) with the recipe as ``args``,
so ``serve deploy`` builds the same graph on a running cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from mova.checkpoint import load_config
from pipelines.common.checkpoint_store import local_checkpoint
from pipelines.common.recipe import load_recipe
from pipelines.serve.deployments import AdapterServer, ExpertServer
from pipelines.serve.ingress import MoVAIngress
from pipelines.serve.llm import LLMServer
from pipelines.serve.recipe import ServeRecipe, recipe_dict

log = logging.getLogger(__name__)

IMPORT_PATH = "pipelines.serve.app:build_app"
LOGGING = {"enable_access_log": False, "log_level": "WARNING"}


def expert_deployment_name(expert: str) -> str:
    return f"Expert_{expert}"


def _absolute(recipe: ServeRecipe) -> ServeRecipe:
    recipe = recipe.absolute()
    recipe.limits.allowed_image_dirs = [str(Path(d).expanduser().resolve())
                                        for d in recipe.limits.allowed_image_dirs]
    return recipe


def pool_of(recipe: ServeRecipe) -> list[str]:
    """The checkpoint's expert pool (an s3:// checkpoint is fetched once into the node's
    cache, as every replica does with
    :func:`pipelines.common.checkpoint_store.local_checkpoint`)."""
    pool = load_config(local_checkpoint(recipe.checkpoint, parts=["meta"])).expert_names
    recipe.check_pool(pool)
    return pool


def deployment_table(recipe: ServeRecipe, pool: list[str]) -> dict[str, dict[str, Any]]:
    """Deployment name -> its Serve options, for every deployment of the app."""
    table = {"Ingress": recipe.ingress.options(), "Adapter": recipe.adapter.options(),
             "LLM": recipe.llm.options()}
    table["Ingress"].pop("user_config")
    for name in pool:
        table[expert_deployment_name(name)] = recipe.experts.for_expert(name).options()
    # a replica Serve stops (scaling down, a redeploy) finishes what it holds first: its
    # requests end by their deadline, or by the watchdog's verdict just after it
    drain_s = recipe.limits.request_timeout_s + recipe.limits.stall_grace_s
    for options in table.values():
        options["graceful_shutdown_timeout_s"] = drain_s
        if "user_config" in options:
            options["user_config"]["stall_grace_s"] = recipe.limits.stall_grace_s
    return table


def recipe_from_args(args: dict[str, Any] | ServeRecipe) -> ServeRecipe:
    """The recipe an application's ``args`` describe: a ``ServeRecipe``, its fields as a dict,
    or ``{"config": "jobs/serve.yaml", "overrides": ["key=value", ...]}`` (a recipe file,
    relative to the working directory, as a RayService names it), optionally with fields."""
    if isinstance(args, ServeRecipe):
        return args
    data = dict(args)
    config = data.pop("config", None)
    overrides = data.pop("overrides", None) or []
    if config is None and overrides:
        raise ValueError("serve args: 'overrides' needs 'config' (a recipe file)")
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ValueError("serve args: 'overrides' must be a list of 'key=value' strings")
    return load_recipe(ServeRecipe, config, overrides, fields=data)


def engine_config(recipe: ServeRecipe) -> dict[str, Any]:
    """What an LLM replica needs to start its engine (fixed for the replica's life; ``auto``
    is resolved by the replica, where the engine runs)."""
    return {"kind": recipe.llm.engine, "max_rows": recipe.llm.max_batch_size,
            "threads": recipe.llm.threads,
            "stall_grace_s": recipe.limits.stall_grace_s,
            "vllm": dataclasses.asdict(recipe.llm.vllm)}


def build_app(args: dict[str, Any] | ServeRecipe):
    """The Serve application for a recipe (see :func:`recipe_from_args` for ``args``)."""
    recipe = recipe_from_args(args)
    recipe = _absolute(recipe.validate())
    pool = pool_of(recipe)
    table = deployment_table(recipe, pool)
    env_vars = recipe.runtime_env.get("env_vars")
    if env_vars:  # also when deployed from a driver whose Ray was started without them
        for options in table.values():
            options["ray_actor_options"]["runtime_env"] = {"env_vars": dict(env_vars)}
    ckpt, device = recipe.checkpoint, recipe.device
    adapter = AdapterServer.options(name="Adapter", **table["Adapter"]).bind(ckpt, device)
    llm = LLMServer.options(name="LLM", **table["LLM"]).bind(
        ckpt, device, recipe.constrained_routing, engine_config(recipe))
    experts = {
        name: ExpertServer.options(name=expert_deployment_name(name),
                                   **table[expert_deployment_name(name)]).bind(ckpt, name,
                                                                                device)
        for name in pool
    }
    return MoVAIngress.options(name="Ingress", **table["Ingress"]).bind(
        recipe_dict(recipe), adapter, llm, experts)


def serve_config(recipe: ServeRecipe) -> dict[str, Any]:
    """A Serve config file (``serve deploy``) for the recipe."""
    recipe = _absolute(recipe.validate())
    pool = pool_of(recipe)
    app: dict[str, Any] = {
        "name": recipe.app_name, "route_prefix": recipe.route_prefix,
        "import_path": IMPORT_PATH, "args": recipe_dict(recipe),
        "logging_config": dict(LOGGING),
        "deployments": [{"name": name, **opts}
                        for name, opts in deployment_table(recipe, pool).items()],
    }
    if recipe.runtime_env:
        app["runtime_env"] = recipe.runtime_env
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": recipe.host, "port": recipe.port,
                         "request_timeout_s": recipe.limits.request_timeout_s + 5},
        "logging_config": dict(LOGGING),
        "applications": [app],
    }


def write_serve_config(recipe: ServeRecipe, path: str | Path) -> Path:
    """Write :func:`serve_config` as YAML after checking it against Serve's own schema."""
    config = serve_config(recipe)
    ServeDeploySchema.model_validate(config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Written by `mova serve --write-serve-config`; apply with "
                    "`serve deploy <this file>`.\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def check_cpu_budget(recipe: ServeRecipe, pool: list[str], cpus: float) -> None:
    """Every replica at its maximum must fit, or a replica would stay pending forever."""
    need = recipe.max_cpus(pool)
    if need > cpus + 1e-9:
        raise ValueError(f"serve recipe: the deployments need {need:g} CPUs at their maximum "
                         f"replica counts but Ray has {cpus:g}; lower num_cpus or max_replicas")


def start(recipe: ServeRecipe) -> str:
    """Deploy the app on the connected Ray (starting Serve if needed); returns its base URL."""
    recipe = _absolute(recipe.validate())
    recipe.check_exposure()
    pool = pool_of(recipe)

    check_cpu_budget(recipe, pool, ray.cluster_resources().get("CPU", 0.0))
    serve.start(http_options={"host": recipe.host, "port": recipe.port,
                              "request_timeout_s": recipe.limits.request_timeout_s + 5},
                logging_config=LOGGING)
    serve.run(build_app(recipe), name=recipe.app_name, route_prefix=recipe.route_prefix,
              logging_config=LOGGING)
    prefix = recipe.route_prefix.rstrip("/")
    return f"http://{recipe.host}:{recipe.port}{prefix}"


def serve_forever(recipe: ServeRecipe, stop: threading.Event | None = None) -> None:
    """`mova serve`: start Ray (or join ``ray.address``), deploy, block until interrupted or
    ``stop`` is set, then shut down: the whole private Ray, or only this app on a cluster."""
    recipe.validate()
    joined = recipe.joins_cluster()
    recipe.start_ray(runtime_env=(recipe.runtime_env or None) if joined else None)
    stop = stop or threading.Event()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if main else None
    try:
        url = start(recipe)
        log.info("serving %r at %s/v1 (OpenAI-compatible); Ctrl-C to stop", recipe.model_name,
                 url)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        log.info("shutting down")
        try:
            if joined:
                serve.delete(recipe.app_name)
            else:
                serve.shutdown()
        finally:
            if not joined:
                ray.shutdown()
    log.info("stopped")
