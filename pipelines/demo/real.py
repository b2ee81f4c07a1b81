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
with MoVA both routing itself and with ``dinov2`` forced. Its steps load the ``jobs/`` recipes with
the ``real`` plan's overrides (:mod:`pipelines.demo.plans`), on the demos' shared session.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mova.factory import build_model
from pipelines.common.manifests.rows import write_manifest
from pipelines.data.benchmarks import convert_easyvqa
from pipelines.data.synth import SynthRecipe, generate
from pipelines.demo.plans import REAL, Plan
from pipelines.demo.session import DemoSession, RunRecord
from pipelines.evaluate.job import run_eval
from pipelines.evaluate.recipe import EvalRecipe
from pipelines.model.real_assets import default_cache_dir, prepare_real_assets, real_config

log = logging.getLogger(__name__)

EASYVQA_LABEL = ["dinov2"]  # shapes and colours: the scene expert (the synthetic scenes' too)
# label -> (the trained model, eval routing, forced experts)
COMPARED = {"base-only": ("base", "forced", []),
            "MoVA (the LLM routes)": ("mova", "model", []),
            "MoVA (dinov2 forced)": ("mova", "forced", ["dinov2"])}


@dataclass
class RealDemoResult(RunRecord):
    accuracy: dict[str, float] = field(default_factory=dict)
    questions: int = 0
    train_rows: dict[str, int] = field(default_factory=dict)
    final_loss: dict[str, float] = field(default_factory=dict)


def _sample_rows(path: Path, n: int, seed: int) -> list[dict]:
    """``n`` rows of a JSONL manifest drawn at random (easy-VQA lists ~10 questions per image
    in a row: the first n would cover few images)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    return rng.sample(rows, min(n, len(rows)))


def build_data(synth: SynthRecipe, train_questions: int, test_questions: int,
               seed: int = 0) -> dict[str, str]:
    """easy-VQA (train sample + test sample) and the synthetic domains (``synth``), as three
    manifests beside synth's own: MoVA's training rows, the base-only model's (no experts, no
    routing rows) and the test."""
    data = Path(synth.out)
    made = generate(synth)
    with tempfile.TemporaryDirectory(prefix="mova-easyvqa-") as tmp:
        paths = {}
        for split in ("train", "test"):
            paths[split] = Path(tmp) / f"{split}.jsonl"
            convert_easyvqa(None, str(paths[split]), split=split)
        train = _sample_rows(paths["train"], train_questions, seed)
        test = _sample_rows(paths["test"], test_questions, seed + 1)
    for row in train:
        row["experts"] = list(EASYVQA_LABEL)
        row["domain"] = "easyvqa"
    synth_rows = [json.loads(line) for line in
                  Path(made.train_manifest).read_text().splitlines() if line.strip()]
    mova_rows = train + synth_rows
    base_rows = [{**r, "experts": []} for r in mova_rows if r.get("kind") != "routing"]
    random.Random(seed).shuffle(mova_rows)
    random.Random(seed).shuffle(base_rows)
    # beside synth's train.jsonl, so its relative image paths stay valid
    return {"mova": write_manifest(mova_rows, str(data / "train.mova.jsonl")),
            "base": write_manifest(base_rows, str(data / "train.base.jsonl")),
            "test": write_manifest(test, str(data / "easyvqa_test.jsonl")),
            "counts": json.dumps({"mova": len(mova_rows), "base": len(base_rows),
                                  "easyvqa_train": len(train), "test": len(test)})}


class RealDemo:
    """The real-weights demo's steps, in one session."""

    def __init__(self, session: DemoSession[RealDemoResult], seed: int) -> None:
        self.s, self.seed = session, seed
        self.root, self.echo, self.result = session.root, session.echo, session.result

    def data(self) -> dict[str, str]:
        sizes = self.s.plan.sizes
        data = self.s.step("easy-VQA (sampled) + the synthetic domains: MoVA and base-only "
                           "manifests",
                           lambda: build_data(self.s.recipe("synth", SynthRecipe,
                                                            out=self.root / "data",
                                                            seed=self.seed),
                                              sizes["train_questions"],
                                              sizes["test_questions"], self.seed))
        self.result.train_rows = json.loads(data["counts"])
        self.echo(f"    {self.result.train_rows}")
        return data

    def init(self, cache: str | Path | None) -> Path:
        assets = self.s.step("Real weights from packages: SmolLM2-135M, MiniLM, DINOv2-S "
                             "(mova model prepare-real)",
                             lambda: prepare_real_assets(cache or default_cache_dir()))
        self.echo(f"    cache {assets.cache}")

        def init() -> Path:
            config = real_config(assets, image_size=self.s.plan.sizes["image_size"])
            return Path(build_model(config, seed=self.seed).save_pretrained(self.root / "init"))

        return self.s.step("MoVA with the real LLM, text encoder and dinov2 expert "
                           "(mova model init)", init)

    def features(self, manifest: str, init_path: Path) -> None:
        self.s.features("Expert-feature cache for the labelled experts (mova features)",
                        manifest, init_path)

    def train_both(self, init_path: Path, data: dict[str, str]) -> dict[str, str]:
        steps = int(self.s.plan.value("sft", "max_steps"))

        def train() -> dict[str, str]:
            outputs = {}
            for name in ("mova", "base"):
                self.echo(f"    training {name} ...")
                trained = self.s.train("sft", f"real-{name}", init_from=init_path,
                                       manifest=data[name], output=name, seed=self.seed)
                self.result.final_loss[name] = trained.final_loss
                outputs[name] = trained.output
            return outputs

        return self.s.step(f"Train MoVA and the base-only model the same way: LoRA + adapter, "
                           f"{steps} steps each (mova train)", train)

    def evaluate(self, trained: dict[str, str], test: str) -> None:
        def evaluate() -> None:
            for i, (label, (model, routing, experts)) in enumerate(COMPARED.items()):
                recipe = self.s.recipe(
                    "eval", EvalRecipe, run_name=f"real-eval-run{i}",
                    checkpoint=trained[model], routing=routing, experts=experts,
                    benchmarks=[{"name": "easyvqa", "path": test}],
                    output=self.root / "eval" / f"run{i}")
                score = run_eval(recipe).scores["easyvqa"]
                self.result.accuracy[label], self.result.questions = score.score, score.questions

        self.s.step("easy-VQA test accuracy (mova eval)", evaluate)


def run_real_demo(out: str | Path = "outputs/demo-real", plan: Plan = REAL, *,
                  seed: int = 0, cache: str | Path | None = None,
                  echo: Callable[[str], None] = print) -> RealDemoResult:
    """Prepare (or reuse) the real weights, build the data, train MoVA and the base-only model
    the same way, and compare them on easy-VQA test questions."""
    session = DemoSession(out, plan, 6, record="real.json", ray_prefix="mova-real-ray-",
                          echo=echo,
                          result=lambda root, uri: RealDemoResult(out=root, tracking_uri=uri))
    with session:
        demo = RealDemo(session, seed)
        init_path = demo.init(cache)
        data = demo.data()
        demo.features(data["mova"], init_path)
        trained = demo.train_both(init_path, data)
        demo.evaluate(trained, data["test"])
    echo(report(session.result))
    return session.result

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
