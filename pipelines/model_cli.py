"""`mova model`: create an initial checkpoint from a model config, or describe a checkpoint."""

from __future__ import annotations

import argparse
import json

from mova.config import MoVAConfig, apply_overrides


def init(args: argparse.Namespace) -> int:
    from mova.factory import build_model

    data = MoVAConfig.load(args.config).to_dict() if args.config else MoVAConfig().to_dict()
    config = MoVAConfig.from_dict(apply_overrides(data, args.overrides))
    model = build_model(config, seed=args.seed)
    path = model.save_pretrained(args.out, experts=args.experts)
    params = sum(p.numel() for p in model.parameters())
    print(f"Initial MoVA ({params / 1e6:.2f}M parameters, experts {config.expert_names}) "
          f"saved to {path}")
    return 0


def info(args: argparse.Namespace) -> int:
    from mova.checkpoint import expert_cache_keys, load_config, read_components

    config = load_config(args.checkpoint)
    components = read_components(args.checkpoint)
    keys = expert_cache_keys(args.checkpoint)
    print(json.dumps({
        "experts": {n: {"stored": "reference" if "reference" in e else "copy",
                        "cache_key": keys[n]} for n, e in components["experts"].items()},
        "image_tokens": config.num_image_tokens,
        "routing_tokens": config.num_routing_tokens,
        "config": config.to_dict(),
    }, indent=2))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="create or inspect model checkpoints")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    pi = msub.add_parser("init", help="build a model from a config and save it (random init "
                                      "where nothing is pretrained)")
    pi.add_argument("--config", help="MoVAConfig YAML/JSON (default: the tiny embedded model)")
    pi.add_argument("--out", required=True, help="checkpoint folder to write")
    pi.add_argument("--seed", type=int, default=0)
    pi.add_argument("--experts", choices=("copy", "reference"), default="copy",
                    help="store frozen experts as copies or by their pretrained id")
    pi.add_argument("overrides", nargs="*", help="key=value config overrides")
    pi.set_defaults(func=init)
    pn = msub.add_parser("info", help="describe a checkpoint")
    pn.add_argument("checkpoint")
    pn.set_defaults(func=info)
