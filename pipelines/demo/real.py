"""`mova demo --real`: MoVA on the real pretrained weights that ship in packages, on easy-VQA.

SmolLM2-135M-Instruct is the LLM, all-MiniLM-L6-v2 the text encoder and the DINOv2-S/14
backbone the ``dinov2`` expert (prepared once into a local cache by
:func:`pipelines.model.real_assets.prepare_real_assets`); the CLIP base encoder and the six other
experts stay tiny random-initialised models of their real architectures (no weights for them
ship in any package). Two models are trained the same way (same init, data, steps, seed, LoRA
on the LLM plus the MoV-Adapter, on Ray Train + DeepSpeed) on easy-VQA plus the synthetic
domains: MoVA, whose rows carry routing labels (easy-VQA rows: ``dinov2``) and routing-
instruction rows, and a base-only model whose rows carry no expert at all. Both answer the
easy-VQA test questions (Ray Data batch inference); the report puts their accuracy side by side,
with MoVA both routing itself and with ``dinov2`` forced.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mova.factory import build_model
from pipelines.common.manifests.validate import write_manifest
from pipelines.common.recipe import MlflowConfig, RayConfig
from pipelines.data.benchmarks import convert_easyvqa
from pipelines.data.synth import SynthRecipe, generate
from pipelines.demo.console import (
    EXPERIMENT,
    DemoRay,
    Steps,
    TrainProgress,
    prepare_out,
    quiet_screen,
)
from pipelines.evaluate.job import run_eval
from pipelines.evaluate.recipe import BenchmarkSpec, EvalRecipe
from pipelines.features.job import run_features
from pipelines.features.recipe import FeaturesRecipe
from pipelines.model.real_assets import default_cache_dir, prepare_real_assets, real_config
from pipelines.train.job import run_train
from pipelines.train.recipe import DeepSpeedConfig, LoraConfig, OptimConfig, TrainRecipe

log = logging.getLogger(__name__)

EASYVQA_LABEL = ["dinov2"]  # shapes and colours: the scene expert (the synthetic scenes' too)


@dataclass
class RealPlan:
    """Sizes of one ``--real`` run (``quick`` is a smoke test of the code path)."""

    train_questions: int = 480
    test_questions: int = 200
    synth_per_domain: int = 16
    routing_samples: int = 32
    image_size: int = 224
    steps: int = 80
    batch_size: int = 4
    lr: float = 3e-4
    lora_r: int = 16
    max_new_tokens: int = 4
    seed: int = 0

    @classmethod
    def quick(cls) -> RealPlan:
        return cls(train_questions=16, test_questions=8, synth_per_domain=2, routing_samples=4,
                   steps=2, batch_size=2)


@dataclass
class RealDemoResult:
    out: str
    tracking_uri: str
    steps_seconds: dict[str, float] = field(default_factory=dict)
    accuracy: dict[str, float] = field(default_factory=dict)
    questions: int = 0
    train_rows: dict[str, int] = field(default_factory=dict)
    final_loss: dict[str, float] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _sample_rows(path: Path, n: int, seed: int) -> list[dict]:
    """``n`` rows of a JSONL manifest drawn at random (easy-VQA lists ~10 questions per image
    in a row: the first n would cover few images)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    return rng.sample(rows, min(n, len(rows)))


def _write_rows(rows: list[dict], path: Path) -> str:
    return write_manifest(rows, str(path))


def build_data(root: Path, plan: RealPlan) -> dict[str, str]:
    """easy-VQA (train sample + test sample) and the synthetic domains, as three manifests:
    MoVA's training rows, the base-only model's (no experts, no routing rows) and the test."""
    data = root / "data"
    synth = generate(SynthRecipe(out=str(data), seed=plan.seed, per_domain=plan.synth_per_domain,
                                 test_per_domain=1, image_size=64,
                                 routing_samples=plan.routing_samples))
    with tempfile.TemporaryDirectory(prefix="mova-easyvqa-") as tmp:
        paths = {}
        for split in ("train", "test"):
            paths[split] = Path(tmp) / f"{split}.jsonl"
            convert_easyvqa(None, str(paths[split]), split=split)
        train = _sample_rows(paths["train"], plan.train_questions, plan.seed)
        test = _sample_rows(paths["test"], plan.test_questions, plan.seed + 1)
    for row in train:
        row["experts"] = list(EASYVQA_LABEL)
        row["domain"] = "easyvqa"
    synth_rows = [json.loads(line) for line in
                  Path(synth.train_manifest).read_text().splitlines() if line.strip()]
    mova_rows = train + synth_rows
    base_rows = [{**r, "experts": []} for r in mova_rows if r.get("kind") != "routing"]
    random.Random(plan.seed).shuffle(mova_rows)
    random.Random(plan.seed).shuffle(base_rows)
    # beside synth's train.jsonl, so its relative image paths stay valid
    return {"mova": _write_rows(mova_rows, data / "train.mova.jsonl"),
            "base": _write_rows(base_rows, data / "train.base.jsonl"),
            "test": _write_rows(test, data / "easyvqa_test.jsonl"),
            "counts": json.dumps({"mova": len(mova_rows), "base": len(base_rows),
                                  "easyvqa_train": len(train), "test": len(test)})}


def _train(plan: RealPlan, root: Path, name: str, init: Path, manifest: str, tracking_uri: str,
           echo: Callable[[str], None]):
    recipe = TrainRecipe(
        stage="sft", init_from=str(init), manifest=manifest, cache=str(root / "features"),
        features="cached", output=str(root / name), name=f"real-{name}",
        storage_path=str(root / "ray_results"), num_workers=2, cpus_per_worker=0.5,
        deepspeed=DeepSpeedConfig(zero_stage=2),
        optim=OptimConfig(lr=plan.lr, warmup_ratio=0.05, min_lr_ratio=0.1),
        lora=LoraConfig(enabled=True, r=plan.lora_r, alpha=2 * plan.lora_r),
        batch_size=plan.batch_size, max_steps=plan.steps, checkpoint_every=plan.steps,
        keep_checkpoints=1, log_every=max(1, plan.steps // 12), seed=plan.seed,
        mlflow=MlflowConfig(tracking_uri=tracking_uri, experiment=EXPERIMENT,
                            run_name=f"real-{name}", system_metrics=False),
        ray=RayConfig(address="local")).validate()
    with TrainProgress(tracking_uri, recipe.mlflow.run_name, plan.steps, echo):
        return run_train(recipe)


def _accuracy(plan: RealPlan, root: Path, name: str, checkpoint: str, test: str,
              tracking_uri: str, routing: str, experts: list[str]) -> tuple[float, int]:
    summary = run_eval(EvalRecipe(
        checkpoint=checkpoint, benchmarks=[BenchmarkSpec(name="easyvqa", path=test)],
        max_new_tokens=plan.max_new_tokens, batch_size=16, workers=1, cpus_per_worker=1.0,
        routing=routing, experts=experts, output=str(root / "eval" / name),
        mlflow=MlflowConfig(tracking_uri=tracking_uri, experiment=EXPERIMENT,
                            run_name=f"real-eval-{name}", system_metrics=False),
        ray=RayConfig(address="local")).validate())
    score = summary.scores["easyvqa"]
    return score.score, score.questions


def run_real_demo(out: str | Path = "outputs/demo-real", plan: RealPlan | None = None, *,
                  cache: str | Path | None = None,
                  echo: Callable[[str], None] = print) -> RealDemoResult:
    """Prepare (or reuse) the real weights, build the data, train MoVA and the base-only model
    the same way, and compare them on easy-VQA test questions."""
    plan = plan or RealPlan()
    quiet_screen()
    start = time.perf_counter()
    root = prepare_out(Path(out))
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    result = RealDemoResult(out=str(root), tracking_uri=tracking_uri)
    steps = Steps(6, result, echo)  # type: ignore[arg-type]
    with DemoRay(root, "mova-real-ray-", echo) as local_ray:
        assets = steps.run("Real weights from packages: SmolLM2-135M, MiniLM, DINOv2-S "
                           "(mova model prepare-real)",
                           lambda: prepare_real_assets(cache or default_cache_dir()))
        echo(f"    cache {assets.cache}")
        data = steps.run("easy-VQA (sampled) + the synthetic domains: MoVA and base-only "
                         "manifests", lambda: build_data(root, plan))
        result.train_rows = json.loads(data["counts"])
        echo(f"    {result.train_rows}")

        def init() -> Path:
            model = build_model(real_config(assets, image_size=plan.image_size),
                                seed=plan.seed)
            return Path(model.save_pretrained(root / "init"))

        init_path = steps.run("MoVA with the real LLM, text encoder and dinov2 expert "
                              "(mova model init)", init)
        local_ray.start()
        steps.run("Expert-feature cache for the labelled experts (mova features)",
                  lambda: run_features(FeaturesRecipe(
                      manifest=data["mova"], checkpoint=str(init_path),
                      cache=str(root / "features"), experts="label", dtype="float32",
                      batch_size=16,
                      ray=RayConfig(address="local")).validate()))

        def train_both() -> dict[str, str]:
            outputs = {}
            for name in ("mova", "base"):
                echo(f"    training {name} ...")
                trained = _train(plan, root, name, init_path, data[name], tracking_uri, echo)
                result.final_loss[name] = trained.final_loss
                outputs[name] = trained.output
            return outputs

        trained = steps.run(f"Train MoVA and the base-only model the same way: LoRA + adapter, "
                            f"{plan.steps} steps each (mova train)", train_both)

        def evaluate() -> None:
            runs = {"base-only": (trained["base"], "forced", []),
                    "MoVA (the LLM routes)": (trained["mova"], "model", []),
                    "MoVA (dinov2 forced)": (trained["mova"], "forced", ["dinov2"])}
            for i, (label, (ckpt, routing, experts)) in enumerate(runs.items()):
                score, n = _accuracy(plan, root, f"run{i}", ckpt, data["test"], tracking_uri,
                                     routing, experts)
                result.accuracy[label], result.questions = score, n

        steps.run("easy-VQA test accuracy (mova eval)", evaluate)
    result.stopped = local_ray.stopped
    result.seconds = time.perf_counter() - start
    (root / "real.json").write_text(json.dumps(dataclasses.asdict(result), indent=2,
                                               default=str))
    echo(report(result))
    return result


def report(r: RealDemoResult) -> str:
    lines = [f"\nThe real-weights demo finished in {r.seconds / 60:.1f} min. Outputs under "
             f"{r.out} (real.json, eval/, mova/, base/).",
             f"| easy-VQA test ({r.questions} questions, exact match) | accuracy |", "|---|---|"]
    lines += [f"| {k} | {100 * v:.1f}% |" for k, v in r.accuracy.items()]
    lines += ["Final training loss: " + ", ".join(f"{k} {v:.3f}"
                                                    for k, v in r.final_loss.items()),
              f"MLflow: mlflow ui --backend-store-uri {r.tracking_uri}"]
    if r.stopped:
        lines.append("Stopped: " + "; ".join(r.stopped) + ".")
    return "\n".join(lines)
