"""``mova data``: generate the synthetic data set, validate manifests, convert public formats
to them."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from mova.metrics import METRICS
from pipelines.common.command import recipe_command
from pipelines.common.manifests.rows import ManifestError
from pipelines.common.manifests.scan import scan_manifest, write_report_part
from pipelines.common.manifests.validate import validate_manifest
from pipelines.common.ray_init import init_ray, worker_env
from pipelines.common.storage import StorageError
from pipelines.data.benchmarks import BENCHMARK_CONVERTERS, BENCHMARK_METRICS, convert_benchmark
from pipelines.data.convert import convert_llava, convert_vqa
from pipelines.data.synth import SynthRecipe, generate

ERROR_LIMIT = 50


def _pool(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [name.strip() for name in text.split(",") if name.strip()]


def run_validate(args: argparse.Namespace) -> int:
    """Validate a manifest; exit code 1 when any row is bad, 2 when storage fails."""
    images = "images not checked" if args.no_check_images else "images checked"
    try:
        if args.ray:
            return _validate_on_ray(args, images)
        report = validate_manifest(args.manifest, pool=_pool(args.pool),
                                   check_images=not args.no_check_images)
    except (StorageError, ManifestError) as exc:
        print(f"mova data validate: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.manifest}: {report.total} rows, {len(report.samples)} ok, "
          f"{len(report.errors)} error(s) in {report.bad_rows} row(s) ({images})")
    if args.report and report.errors:
        write_report_part(args.report, "rows", [asdict(e) for e in report.errors])
    if report.ok:
        return 0
    print(report.format(limit=ERROR_LIMIT))
    return 1


def _validate_on_ray(args: argparse.Namespace, images: str) -> int:
    """The scan the jobs run: Ray tasks stream byte ranges (or row groups) of the manifest, the
    driver keeps counts and the first errors, ``--report`` gets every bad row."""
    init_ray(runtime_env={"env_vars": worker_env()})
    scan = scan_manifest(args.manifest, pool=_pool(args.pool), report=args.report,
                         reuse=False, check_images=not args.no_check_images)
    print(f"{args.manifest}: {scan.rows} rows, {scan.valid} ok, {scan.error_count} error(s) "
          f"in {scan.rows - scan.valid} row(s) ({images}; rows checked by Ray tasks)")
    if scan.ok:
        return 0
    print(scan.format_errors())
    if args.report:
        print(f"every bad row: {args.report}")
    return 1


def run_convert(args: argparse.Namespace) -> int:
    """Convert a LLaVA JSON, VQA JSONL or public benchmark file to a manifest."""
    src = getattr(args, "src", None)
    try:
        if args.format == "llava":
            count = convert_llava(src, args.out, image_root=args.image_root)
        elif args.format == "vqa":
            count = convert_vqa(src, args.out, image_root=args.image_root,
                                metric=args.metric)
        else:
            options = {k: getattr(args, k) for k in ("annotations", "split", "limit")
                       if getattr(args, k, None) is not None}
            count = convert_benchmark(args.format, src, args.out,
                                      image_root=getattr(args, "image_root", None), **options)
            src = src or f"easy-VQA {args.split}"
    except (StorageError, ImportError) as exc:
        print(f"mova data convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {count} sample(s) from {src} to {args.out}")
    print(f"check it with: mova data validate {args.out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``data`` with ``synth``, ``validate`` and ``convert``."""
    p = sub.add_parser("data", help="synthetic data, manifest validation, converters",
                       description="Generate the synthetic data set, validate manifests "
                                   "(JSONL/Parquet, local or s3://) and convert public data "
                                   "sets to them.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    recipe_command(data_sub, "synth", recipe=SynthRecipe,
                   job=lambda recipe: generate(recipe, progress=True),
                   help="generate the synthetic multi-domain data set (CPU, seconds)",
                   doc="Draw documents, charts, shape scenes and scans with checkable answers, "
                       "plus routing-instruction samples; deterministic by seed.",
                   example="jobs/synth.yaml")

    v = data_sub.add_parser("validate", help="check every row of a manifest (local or s3://)")
    v.add_argument("manifest", help="a .jsonl/.json or .parquet manifest")
    v.add_argument("--pool", metavar="A,B,C",
                   help="comma-separated expert pool (default: the default pool)")
    v.add_argument("--no-check-images", action="store_true",
                   help="do not open and decode the images")
    v.add_argument("--ray", action="store_true",
                   help="check the rows with Ray tasks, as jobs do (RAY_ADDRESS, else a "
                        "private local Ray): memory stays flat in the manifest's size")
    v.add_argument("--report", metavar="DIR",
                   help="write every bad row to JSON-lines files in DIR (local or s3://)")
    v.set_defaults(func=run_validate)

    c = data_sub.add_parser("convert", help="convert LLaVA JSON, VQA JSONL or a public "
                                            "benchmark to a manifest")
    formats = c.add_subparsers(dest="format", required=True, metavar="FORMAT")
    llava = formats.add_parser("llava", help="LLaVA instruction JSON (a list of samples)")
    vqa = formats.add_parser("vqa", help="VQA JSON lines (image, question, answers)")
    for fp in (llava, vqa):
        fp.add_argument("src", help="input file (local or s3://)")
        fp.add_argument("out", help="output manifest (.jsonl or .parquet; local or s3://)")
        fp.add_argument("--image-root", metavar="DIR",
                        help="folder the input's image paths are relative to "
                             "(default: the input's folder)")
        fp.set_defaults(func=run_convert)
    vqa.add_argument("--metric", default="vqa_accuracy", choices=sorted(METRICS),
                     help="evaluation metric of the answers (default: vqa_accuracy)")
    _add_benchmark_parsers(formats)


def _add_benchmark_parsers(formats: argparse._SubParsersAction) -> None:
    """One ``convert`` format per public benchmark (``pipelines.data.benchmarks``)."""
    for name in BENCHMARK_CONVERTERS:
        fp = formats.add_parser(name, help=f"the {name} benchmark's public format "
                                           f"(metric: {BENCHMARK_METRICS[name]})")
        if name == "easyvqa":
            fp.add_argument("split", choices=("train", "test"),
                            help="easy-VQA split (from the installed easy-vqa package)")
            fp.add_argument("out", help="output manifest (.jsonl or .parquet; local or s3://)")
            fp.add_argument("--limit", type=int, metavar="N", help="keep the first N questions")
            fp.set_defaults(func=run_convert)
            continue
        src_help = "the MME release folder" if name == "mme" else (
            "a POPE .json(l) file or a folder of them" if name == "pope" else
            "the questions file (local or s3://)")
        fp.add_argument("src", help=src_help)
        fp.add_argument("out", help="output manifest (.jsonl or .parquet; local or s3://)")
        if name != "mme":
            fp.add_argument("--image-root", metavar="DIR",
                            help="folder of the benchmark's images (default: the input's "
                                 "folder)")
        if name == "vqav2":
            fp.add_argument("--annotations", metavar="FILE",
                            help="the annotations JSON (default: the official sibling name)")
        fp.set_defaults(func=run_convert)
