"""Deploying the Serve app in the serve tests (imported as ``from served import ...``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def served_app(recipe, name: str) -> Iterator[str]:
    """The Serve app of ``recipe`` on the connected Ray (or a private 2-CPU one, stopped
    after); yields its base URL and shuts Serve down on the way out."""
    import ray
    from ray import serve

    from pipelines.common.ray_init import init_ray
    from pipelines.serve.app import start

    started = not ray.is_initialized()
    init_ray("local", num_cpus=2, temp_dir=f"/tmp/mova-{name}-test-{os.getpid()}")
    try:
        yield start(recipe)
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
