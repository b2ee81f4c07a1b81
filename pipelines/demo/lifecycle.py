"""`mova demo`: the whole MoVA lifecycle on one machine, on embedded defaults.

synthetic data -> tiny MoVA -> expert-feature cache (Ray Data) -> pretrain (Ray Train +
DeepSpeed) -> loss-driven routing labels (Ray Data) -> SFT on those labels -> evaluation of the
untrained and the trained model (Ray Data) -> the Serve app -> one question through the official
``openai`` client. Every step is the same function its own command runs (``mova data synth``,
``mova features``, ``mova train``, ``mova labels``, ``mova eval``, ``mova serve``), with the
same recipes, so each can be re-run by hand on the outputs. All steps share one private local
Ray and one MLflow store; both are stopped at the end, also on Ctrl-C.

Routing labels come after pretraining, not before: they compare the loss with each single
expert against the base alone, and a freshly initialised MoV-Adapter adds exactly zero for
every expert (its output projections start at zero), so only a pretrained adapter can tell the
experts apart. Pretraining uses the synthetic data's default labels.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from mova.factory import build_tiny_mova
from pipelines.common.ray_init import free_local_port
from pipelines.common.recipe import MlflowConfig, RayConfig, load_recipe
from pipelines.common.wire import MoVAInfo
from pipelines.data.synth import SynthRecipe, generate
from pipelines.demo.console import (
    EXPERIMENT,
    DemoRay,
    Steps,
    TrainProgress,
    prepare_out,
    quiet_screen,
)
from pipelines.demo.report import DemoResult, eval_table, served_text, summary_text
from pipelines.evaluate.http import image_data_uri
from pipelines.evaluate.job import run_eval
from pipelines.evaluate.recipe import BenchmarkSpec, EvalRecipe
from pipelines.features.job import run_features
from pipelines.features.recipe import FeaturesRecipe
from pipelines.labels.job import run_labels
from pipelines.labels.recipe import LabelsRecipe
from pipelines.serve.app import start
from pipelines.serve.recipe import ServeRecipe
from pipelines.train.job import run_train
from pipelines.train.recipe import DeepSpeedConfig, OptimConfig, TrainRecipe


@dataclass
class DemoPlan:
    """Sizes of one demo run (``quick`` is the end-to-end test's)."""

    per_domain: int = 40
    test_per_domain: int = 10
    routing_samples: int = 32
    image_size: int = 64
    pretrain_steps: int = 40
    sft_steps: int = 160
    batch_size: int = 8
    lr: float = 2e-3
    max_new_tokens: int = 12
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoPlan:
        return cls(per_domain=12, test_per_domain=10, routing_samples=8, pretrain_steps=8,
                   sft_steps=100, batch_size=8, max_new_tokens=8)


def _train_recipe(plan: DemoPlan, out: Path, stage: str, init_from: Path, manifest: str,
                  steps: int, tracking_uri: str):
    return TrainRecipe(
        stage=stage, init_from=str(init_from), manifest=manifest, cache=str(out / "features"),
        features="cached", output=str(out / stage), name=f"demo-{stage}",
        storage_path=str(out / "ray_results"), num_workers=2, cpus_per_worker=0.5,
        deepspeed=DeepSpeedConfig(zero_stage=2),
        optim=OptimConfig(lr=plan.lr, warmup_ratio=0.1, min_lr_ratio=0.1),
        batch_size=plan.batch_size, max_steps=steps, checkpoint_every=max(steps, 1),
        keep_checkpoints=1, log_every=max(1, steps // 10), seed=plan.seed,
        mlflow=MlflowConfig(tracking_uri=tracking_uri, experiment=EXPERIMENT,
                            run_name=f"demo-{stage}", system_metrics=False),
        ray=RayConfig(address="local"),
    ).validate()


def _train(plan: DemoPlan, out: Path, stage: str, init_from: Path, manifest: str, steps: int,
           tracking_uri: str, echo: Callable[[str], None]):
    recipe = _train_recipe(plan, out, stage, init_from, manifest, steps, tracking_uri)
    with TrainProgress(tracking_uri, recipe.mlflow.run_name, steps, echo):
        return run_train(recipe)


def _eval(plan: DemoPlan, out: Path, name: str, checkpoint: Path, test: str,
          tracking_uri: str) -> dict[str, Any]:
    summary = run_eval(EvalRecipe(
        checkpoint=str(checkpoint), benchmarks=[BenchmarkSpec(name="synth", path=test)],
        max_new_tokens=plan.max_new_tokens, batch_size=16, workers=1, cpus_per_worker=1.0,
        output=str(out / "eval" / name),
        mlflow=MlflowConfig(tracking_uri=tracking_uri, experiment=EXPERIMENT,
                            run_name=f"eval-{name}", system_metrics=False),
        ray=RayConfig(address="local")).validate())
    score = summary.scores["synth"]
    return {"score": score.score, "details": dict(score.details), "questions": score.questions,
            "activation": summary.activation, "report": summary.report,
            "mlflow_run_id": summary.mlflow_run_id}


def pick_question(test: str) -> dict[str, Any]:
    """The first chart question of the test split (a row with an image and an answer)."""
    rows = [json.loads(line) for line in Path(test).read_text().splitlines() if line.strip()]
    row = next((r for r in rows if r.get("domain") == "charts"), rows[0])
    question = next(t["value"] for t in row["conversations"] if t["from"] == "human")
    answer = next(t["value"] for t in reversed(row["conversations"]) if t["from"] == "gpt")
    image = Path(test).parent / row["image"]
    return {"image": str(image), "question": question.replace("<image>", "").strip(),
            "answer": answer, "domain": row.get("domain")}


def ask_server(checkpoint: Path, sample: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    recipe = load_recipe(ServeRecipe, None, [f"checkpoint={checkpoint}",
                                             f"port={free_local_port()}",
                                             "experts.default.autoscaling.min_replicas=0"])
    url = start(recipe)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=2,
                           timeout=120)
    image = image_data_uri(Path(sample["image"]).read_bytes())
    message = {"role": "user", "content": [
        {"type": "text", "text": sample["question"]},
        {"type": "image_url", "image_url": {"url": image}}]}
    reply = client.chat.completions.create(model=recipe.model_name, messages=[message],
                                           max_tokens=max_tokens, temperature=0)
    ext = MoVAInfo.from_response(reply)
    return {"url": f"{url}/v1", "question": sample["question"], "image": sample["image"],
            "true_answer": sample["answer"], "answer": reply.choices[0].message.content,
            "experts": ext.experts, "routing_reply": ext.routing_reply,
            "gate_weights": ext.gate_weights, "pool": ext.pool,
            "usage": reply.usage.model_dump() if reply.usage else {}}


class Lifecycle:
    """The demo's steps, in order, sharing its output folder, MLflow store and local Ray."""

    def __init__(self, root: Path, plan: DemoPlan, result: DemoResult, steps: Steps,
                 local_ray: DemoRay, echo: Callable[[str], None]) -> None:
        self.root, self.plan, self.result = root, plan, result
        self.steps, self.ray, self.echo = steps, local_ray, echo
        self.tracking_uri = result.tracking_uri

    def data(self) -> tuple[str, str]:
        plan = self.plan
        data = self.steps.run(
            "Synthetic data: documents, charts, scenes, scans (mova data synth)",
            lambda: generate(SynthRecipe(
                out=str(self.root / "data"), seed=plan.seed, per_domain=plan.per_domain,
                test_per_domain=plan.test_per_domain, image_size=plan.image_size,
                routing_samples=plan.routing_samples)))
        train, test = str(data.train_manifest), str(data.test_manifest)
        self.echo(f"    {data.counts} -> {train}, {test}")
        return train, test

    def init(self) -> Path:
        def build() -> Path:
            model = build_tiny_mova(seed=self.plan.seed)
            path = model.save_pretrained(self.root / "init")
            self.echo(f"    {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
                      f"parameters, pool: {', '.join(model.expert_names)} -> {path}")
            return path

        return self.steps.run("A tiny MoVA of the real architectures, random init "
                              "(mova model init)", build)

    def features(self, train: str, init_path: Path) -> None:
        cpus = self.ray.start()
        self.echo(f"    local Ray started ({cpus:g} CPUs); worker logs go to "
                  f"{self.root / 'ray-logs'}")
        feats = self.steps.run(
            "Expert-feature cache on Ray Data, every expert (mova features)",
            lambda: run_features(FeaturesRecipe(
                manifest=train, checkpoint=str(init_path), cache=str(self.root / "features"),
                experts="all", dtype="float32", batch_size=32,
                ray=RayConfig(address="local")).validate()))
        self.echo(f"    {feats.images} images -> {feats.cache}")

    def train(self, stage: str, init_from: Path, manifest: str, steps: int, title: str) -> Any:
        run = self.steps.run(title, lambda: _train(self.plan, self.root, stage, init_from,
                                                   manifest, steps, self.tracking_uri,
                                                   self.echo))
        self.echo(f"    {run.steps} steps, final loss {run.final_loss:.3f} -> {run.output}")
        return run

    def labels(self, train: str, checkpoint: str) -> str:
        labelled = str(self.root / "data" / "train.labels")
        labels = self.steps.run(
            "Loss-driven routing labels with the pretrained model (mova labels)",
            lambda: run_labels(LabelsRecipe(
                manifest=train, checkpoint=checkpoint, output=labelled,
                cache=str(self.root / "features"), batch_size=16,
                mlflow=MlflowConfig(tracking_uri=self.tracking_uri, experiment=EXPERIMENT,
                                    run_name="labels", system_metrics=False),
                ray=RayConfig(address="local")).validate()))
        self.result.labels = dict(labels.activation)
        self.echo(labels.table())
        return labelled

    def evaluate(self, init_path: Path, trained: Path, test: str) -> None:
        def both() -> None:
            for name, checkpoint in (("untrained", init_path), ("trained", trained)):
                self.result.eval[name] = _eval(self.plan, self.root, name, checkpoint, test,
                                               self.tracking_uri)

        self.steps.run("Evaluate the untrained and the trained model on the test split "
                       "(mova eval, Ray Data)", both)
        self.echo(eval_table(self.result))

    def serve(self, checkpoint: Path, test: str) -> None:
        sample = pick_question(test)

        def ask() -> None:
            self.ray.serve_started = True
            self.result.served = ask_server(checkpoint, sample, self.plan.max_new_tokens)

        self.steps.run("Serve the trained model (mova serve) and ask it through the official "
                       "openai client", ask)
        self.echo(served_text(self.result.served))


def run_demo(out: str | Path = "outputs/demo", plan: DemoPlan | None = None, *,
             serve: bool = True, echo: Callable[[str], None] = print) -> DemoResult:
    """Run the whole lifecycle into ``out``; returns what happened (also on the screen)."""
    plan = plan or DemoPlan()
    quiet_screen()
    start = time.perf_counter()
    root = prepare_out(Path(out))
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    result = DemoResult(out=str(root), tracking_uri=tracking_uri)
    with DemoRay(root, "mova-demo-ray-", echo) as local_ray:
        demo = Lifecycle(root, plan, result, Steps(9 if serve else 8, result, echo), local_ray,
                         echo)
        train, test = demo.data()
        init_path = demo.init()
        demo.features(train, init_path)
        pre = demo.train("pretrain", init_path, train, plan.pretrain_steps,
                         "Pretrain the MoV-Adapter on Ray Train + DeepSpeed ZeRO-2, 2 workers "
                         "(mova train, stage pretrain)")
        labelled = demo.labels(train, pre.output)
        sft = demo.train("sft", Path(pre.output), labelled, plan.sft_steps,
                         "SFT on the new labels: LLM + adapter, routing-instruction rows "
                         "included (mova train, stage sft)")
        demo.evaluate(init_path, Path(sft.output), test)
        if serve:
            demo.serve(Path(sft.output), test)
    result.stopped = local_ray.stopped
    result.seconds = time.perf_counter() - start
    (root / "demo.json").write_text(json.dumps(dataclasses.asdict(result), indent=2,
                                               default=str))
    echo(summary_text(result))
    return result
