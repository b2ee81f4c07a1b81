"""`mova demo --expert-value`: does the system's training make the experts matter?

An experiment on data where an expert sees what the base encoder cannot
(:mod:`pipelines.data.expert_value`: a large shape's colour, which the base sees, and a small
tag's 1-pixel pattern, which only DINOv2 resolves), run with the system's own stages on the
real small weights (SmolLM2-135M-Instruct, all-MiniLM-L6-v2, DINOv2-S/14):

1. ``mova model init``: the real LLM, text encoder and ``dinov2``; the CLIP base encoder stays a
   random, frozen, tiny CLIP that runs at ``base_image_size`` px (28: a 4 x 4 grid). No CLIP
   weights exist offline; a frozen random CLIP at a low resolution keeps what the paper's base
   has against its high-resolution experts: the coarse content of the whole image (a linear
   probe reads the large shape's colour from it 97% of the time), not its fine detail (the
   tag's 1-pixel patterns are one grey at its input: a probe on its corner features reads
   them 22% of the time, chance 25%; on DINOv2's, aligned to the adapter's 4 x 4 grid, 100%).
   Every compared model shares this base.
2. ``mova features``: the candidate experts' features (``dinov2``, and ``sam`` as the wrong
   expert), cached once.
3. ``mova train`` pretrain: the MoV-Adapter and text encoder learn to use both candidates (every
   row fused with both; the LLM frozen).
4. ``mova labels``: loss-driven routing labels on the training rows (an expert joins a row's
   label when it alone lowers the LM loss below the base's), compared with the ground truth.
5. ``mova train`` SFT, twice from the pretrained model, the same steps and seed: MoVA on the
   loss-labelled rows plus routing-instruction rows made from them, and a base-only model whose
   rows carry no expert.
6. ``mova eval`` on held-out questions of both kinds: base-only, MoVA routing itself, MoVA with
   the right expert forced, with the wrong one forced; accuracy with standard errors, and the
   routing's accuracy against the ground truth.

``--quick`` (:data:`pipelines.demo.plans.EXPERT_VALUE_QUICK`) runs the same steps on tiny random
models, a few rows and 2 training steps: a check of the wiring, not of the claim.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable
from pathlib import Path

from mova.experts.registry import DEFAULT_POOL, get_expert_spec
from mova.factory import build_model, tiny_config
from mova.routing import augment_routing_example
from pipelines.common.manifests.rows import manifest_files, read_rows, write_manifest
from pipelines.data.expert_value import DETAIL_EXPERT, KINDS, ExpertValueData, generate
from pipelines.demo.expert_value_report import (
    CANDIDATES,
    COMPARED,
    ROUTED,
    ExpertValueResult,
    log_result,
    report,
    stderr,
)
from pipelines.demo.plans import EXPERT_VALUE, Plan
from pipelines.demo.session import DemoSession
from pipelines.evaluate.job import run_eval
from pipelines.evaluate.recipe import EvalRecipe
from pipelines.labels.job import run_labels
from pipelines.labels.recipe import LabelsRecipe
from pipelines.model.real_assets import default_cache_dir, prepare_real_assets, real_config

log = logging.getLogger(__name__)

def _routed(experts: list[str] | None) -> str:
    return "+".join(sorted(experts)) if experts else "none"


def _agreement(rows: list[dict]) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    """Per question kind: the share of rows whose experts equal their ground truth, and the
    count of each expert set seen."""
    hits: dict[str, list[int]] = {}
    confusion: dict[str, dict[str, int]] = {}
    for row in rows:
        kind, truth = row["meta"]["question_kind"], row["meta"]["truth"]
        got = row.get("experts") or []
        hits.setdefault(kind, []).append(int(sorted(got) == sorted(truth)))
        counts = confusion.setdefault(kind, {})
        counts[_routed(got)] = counts.get(_routed(got), 0) + 1
    return {k: sum(v) / len(v) for k, v in hits.items()}, confusion


def _manifest(uri: str) -> list[dict]:
    """The rows of one of the experiment's small manifests (hundreds of rows)."""
    rows = []
    for line, row in read_rows(uri):
        if not isinstance(row, dict):
            raise ValueError(f"{uri}: row {line} is unreadable: {row}")
        rows.append(row)
    return rows


def routing_rows(rows: list[dict], count: int, seed: int) -> list[dict]:
    """``count`` routing-instruction rows over the default pool, from labelled answer rows
    (their experts are the routing answer)."""
    pool = [(name, get_expert_spec(name).descriptions) for name in DEFAULT_POOL]
    rng = random.Random(f"mova-expert-value:{seed}:routing")
    out = []
    for i in range(count):
        source = rng.choice(rows)
        example = augment_routing_example(source["meta"]["question"], pool,
                                          source.get("experts") or [], rng)
        out.append({"id": f"train-routing-{i:05d}", "image": source["image"],
                    "conversations": [{"from": "human", "value": example.prompt},
                                      {"from": "gpt", "value": example.answer}],
                    "experts": list(source.get("experts") or []), "kind": "routing",
                    "domain": source["domain"], "meta": {"pool": list(example.pool),
                                                         "source": source["id"]}})
    return out


class ExpertValueDemo:
    """The experiment's steps, in one session."""

    def __init__(self, session: DemoSession[ExpertValueResult], seed: int) -> None:
        self.s, self.seed = session, seed
        self.root, self.echo, self.result = session.root, session.echo, session.result
        self.sizes = session.plan.sizes
        self.data_dir = self.root / "data"

    def init(self, cache: str | Path | None) -> Path:
        """The initial model (``--quick``: every part tiny and random, the same wiring)."""
        real = bool(self.sizes.get("real_weights", 1))
        assets = self.s.step("Real weights from packages: SmolLM2-135M, MiniLM, DINOv2-S "
                             "(mova model prepare-real)",
                             lambda: prepare_real_assets(cache or default_cache_dir())
                             ) if real else None

        def init() -> Path:
            config = real_config(assets, image_size=224) if assets else tiny_config()
            config.base.image_size = self.sizes["base_image_size"]
            config.base.trainable = False
            return Path(build_model(config, seed=self.seed).save_pretrained(self.root / "init"))

        parts = (f"the real LLM, text encoder and {DETAIL_EXPERT}" if real
                 else "tiny random parts (--quick)")
        return self.s.step(f"MoVA with {parts}; a frozen random CLIP base at "
                           f"{self.sizes['base_image_size']} px (mova model init)", init)

    def data(self) -> dict[str, str]:
        def make() -> dict[str, str]:
            made = generate(ExpertValueData(
                out=str(self.data_dir), seed=self.seed,
                train_per_kind=self.sizes["train_per_kind"],
                test_per_kind=self.sizes["test_per_kind"]))
            train = _manifest(made["train"])
            # pretraining fuses both candidates on every row (the adapter learns each)
            both = [{**r, "experts": list(CANDIDATES)} for r in train]
            paths = {"pretrain": write_manifest(both, str(self.data_dir / "pretrain.jsonl")),
                     "train": made["train"]}
            test = _manifest(made["test"])
            for kind in KINDS:
                paths[f"test-{kind}"] = write_manifest(
                    [r for r in test if r["meta"]["question_kind"] == kind],
                    str(self.data_dir / f"test-{kind}.jsonl"))
            return paths

        return self.s.step("Data: colour questions (the base sees) and small-tag patterns "
                           "(only an expert sees), ground-truth routing kept", make)

    def features(self, manifest: str, init_path: Path) -> None:
        self.s.features("Expert-feature cache for the candidates (mova features)", manifest,
                        init_path, only=CANDIDATES)

    def _train(self, job: str, name: str, init: Path | str, manifest: str) -> str:
        trained = self.s.train(job, f"ev-{name}", init_from=init, manifest=manifest,
                               output=name, seed=self.seed)
        self.result.final_loss[name] = trained.final_loss
        return trained.output

    def pretrain(self, init_path: Path, manifest: str) -> str:
        return self.s.step("Pretrain: the adapter learns to fuse both candidates (mova train "
                           "pretrain)", lambda: self._train("pretrain", "pretrain", init_path,
                                                            manifest))

    def labels(self, pretrained: str, train: str) -> str:
        output = self.data_dir / "train.labels"

        def label() -> str:
            run_labels(self.s.recipe("labels", LabelsRecipe, manifest=train,
                                     checkpoint=pretrained, output=output,
                                     cache=self.root / "features", only=CANDIDATES))
            agreement, confusion = _agreement(_manifest(str(output)))
            self.result.label_agreement = agreement
            self.echo("    loss-driven labels equal to the ground truth: "
                      + ", ".join(f"{k} {100 * v:.1f}%" for k, v in agreement.items())
                      + f"; labels per kind {confusion}")
            return str(output)

        return self.s.step("Loss-driven routing labels, compared with the ground truth "
                           "(mova labels)", label)

    def sft_both(self, pretrained: str, labelled: str) -> dict[str, str]:
        def train() -> dict[str, str]:
            # the labels' parts name images relative to their own folder
            rows = [{**r, "image": os.path.normpath(Path(labelled) / r["image"])}
                    for r in _manifest(labelled)]
            routing = routing_rows(rows, self.sizes["routing_rows"], self.seed)
            mova_rows = rows + routing
            base_rows = [{**r, "experts": []} for r in rows]
            random.Random(self.seed).shuffle(mova_rows)
            random.Random(self.seed).shuffle(base_rows)
            manifests = {
                "mova": write_manifest(mova_rows, str(self.data_dir / "sft.mova.jsonl")),
                "base": write_manifest(base_rows, str(self.data_dir / "sft.base.jsonl"))}
            self.result.train_rows = {"mova": len(mova_rows), "base": len(base_rows)}
            out = {}
            for name in ("mova", "base"):
                self.echo(f"    training {name} ...")
                out[name] = self._train("sft", name, pretrained, manifests[name])
            return out

        steps = int(self.s.plan.value("sft", "max_steps"))
        return self.s.step(f"SFT MoVA (loss-labelled rows + routing rows) and the base-only "
                           f"model the same way: LoRA + adapter, {steps} steps each "
                           f"(mova train)", train)

    def evaluate(self, trained: dict[str, str], data: dict[str, str]) -> None:
        def evaluate() -> None:
            for i, (label, (model, routing, experts)) in enumerate(COMPARED.items()):
                output = self.root / "eval" / f"run{i}"
                recipe = self.s.recipe(
                    "eval", EvalRecipe, run_name=f"ev-eval-run{i}",
                    checkpoint=trained[model], routing=routing, experts=experts,
                    benchmarks=[{"name": kind, "path": data[f"test-{kind}"]}
                                for kind in KINDS],
                    output=output)
                scores = run_eval(recipe).scores
                self.result.accuracy[label] = {
                    kind: {"accuracy": scores[kind].score, "questions": scores[kind].questions,
                           "stderr": stderr(scores[kind].score, scores[kind].questions)}
                    for kind in KINDS}
                if label == ROUTED:
                    self._routing(output)

        self.s.step("Held-out accuracy per question kind, four ways (mova eval)", evaluate)

    def _routing(self, output: Path) -> None:
        records = [json.loads(line) for part in manifest_files(str(output / "predictions"))
                   for line in Path(part).read_text().splitlines() if line.strip()]
        agreement, confusion = _agreement(records)
        self.result.routing_accuracy, self.result.routing_confusion = agreement, confusion


def run_expert_value(out: str | Path = "outputs/demo-expert-value",
                     plan: Plan = EXPERT_VALUE, *, seed: int = 0,
                     cache: str | Path | None = None,
                     echo: Callable[[str], None] = print) -> ExpertValueResult:
    """Run the experiment from scratch and print its table."""
    session = DemoSession(out, plan, 10, record="expert-value.json",
                          ray_prefix="mova-ev-ray-", echo=echo,
                          result=lambda root, uri: ExpertValueResult(out=root,
                                                                     tracking_uri=uri))
    with session:
        demo = ExpertValueDemo(session, seed)
        init_path = demo.init(cache)
        data = demo.data()
        demo.features(data["pretrain"], init_path)
        pretrained = demo.pretrain(init_path, data["pretrain"])
        labelled = demo.labels(pretrained, data["train"])
        trained = demo.sft_both(pretrained, labelled)
        demo.evaluate(trained, data)
        session.result.mlflow_run_id = session.step(
            "The table, routing confusion and accuracy plot to MLflow",
            lambda: log_result(session.result, session.tracking_uri, session.root))
    echo(report(session.result))
    return session.result
