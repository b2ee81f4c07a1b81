"""`mova serve`: serve a MoVA checkpoint behind an OpenAI-compatible HTTP API on Ray Serve.

`mova serve --config jobs/serve.yaml [key=value ...]` starts the app (a private local Ray, or
the cluster named by ray.address / RAY_ADDRESS) and blocks until Ctrl-C or SIGTERM, then shuts
down cleanly. With --write-serve-config FILE it only writes a Ray Serve config file, which
`serve deploy FILE` applies to a running cluster.
"""

from __future__ import annotations

import argparse
import logging

from pipelines.common.recipe import load_recipe
from pipelines.serve.app import serve_forever, write_serve_config
from pipelines.serve.recipe import ServeRecipe

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(ServeRecipe, args.config, args.overrides)
    if args.write_serve_config:
        path = write_serve_config(recipe, args.write_serve_config)
        print(f"Wrote the Ray Serve config {path}; apply it with: serve deploy {path}")
        return 0

    serve_forever(recipe)
    print("mova serve: stopped")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``serve`` subcommand to the ``mova`` parser."""
    p = sub.add_parser("serve", help="serve a checkpoint (OpenAI-compatible HTTP, Ray Serve)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="recipe YAML (jobs/serve.yaml)")
    p.add_argument("--write-serve-config", metavar="FILE",
                   help="write a Ray Serve config file for `serve deploy` and exit")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    p.set_defaults(func=run)
