"""`mova demo`: the whole MoVA lifecycle on one machine, on embedded defaults.

synthetic data -> tiny MoVA -> expert-feature cache (Ray Data) -> pretrain (Ray Train +
DeepSpeed) -> loss-driven routing labels (Ray Data) -> SFT on those labels -> evaluation of the
untrained and the trained model (Ray Data) -> the Serve app -> one question through the official
``openai`` client. Every step loads its recipe from ``jobs/`` (``mova data synth``,
``mova features``, ``mova train``, ``mova labels``, ``mova eval``, ``mova serve``) with the
plan's few overrides (:mod:`pipelines.demo.plans`) and runs the same function its command
runs, so each can be re-run by hand on the outputs. All steps share one private local Ray and
one MLflow store; both are stopped at the end, also on Ctrl-C.

Routing labels come after pretraining, not before: they compare the loss with each single
expert against the base alone, and a freshly initialised MoV-Adapter adds exactly zero for
every expert (its output projections start at zero), so only a pretrained adapter can tell the
experts apart. Pretraining uses the synthetic data's default labels.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
from ray import serve

from mova.factory import build_tiny_mova
from pipelines.common.ray_init import free_local_port
from pipelines.common.wire import MoVAInfo
from pipelines.data.synth import SynthRecipe, generate
from pipelines.demo.plans import FULL, Plan
from pipelines.demo.report import DemoResult, eval_table, served_text, summary_text
from pipelines.demo.session import DemoSession
from pipelines.evaluate.http import image_data_uri
from pipelines.evaluate.job import run_eval
from pipelines.evaluate.recipe import EvalRecipe
from pipelines.labels.job import run_labels
from pipelines.labels.recipe import LabelsRecipe
from pipelines.serve.app import start
from pipelines.serve.recipe import ServeRecipe


def pick_question(test: str) -> dict[str, Any]:
    """The first chart question of the test split (a row with an image and an answer)."""
    rows = [json.loads(line) for line in Path(test).read_text().splitlines() if line.strip()]
    row = next((r for r in rows if r.get("domain") == "charts"), rows[0])
    question = next(t["value"] for t in row["conversations"] if t["from"] == "human")
    answer = next(t["value"] for t in reversed(row["conversations"]) if t["from"] == "gpt")
    image = Path(test).parent / row["image"]
    return {"image": str(image), "question": question.replace("<image>", "").strip(),
            "answer": answer, "domain": row.get("domain")}


def ask_server(recipe: ServeRecipe, sample: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """Start the Serve app of ``recipe`` and ask it ``sample`` with the openai client."""
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
    llm = serve.get_deployment_handle("LLM", app_name=recipe.app_name)
    engine = llm.info.remote().result(timeout_s=30)["batches"]["decode"]["engine"]
    return {"url": f"{url}/v1", "engine": engine, "question": sample["question"],
            "image": sample["image"], "true_answer": sample["answer"],
            "answer": reply.choices[0].message.content, "experts": ext.experts,
            "routing_reply": ext.routing_reply, "gate_weights": ext.gate_weights, "pool": ext.pool,
            "usage": reply.usage.model_dump() if reply.usage else {}}


class Lifecycle:
    """The demo's steps, in order, in one session (output folder, MLflow store, local Ray)."""

    def __init__(self, session: DemoSession[DemoResult], seed: int) -> None:
        self.s, self.seed = session, seed
        self.root, self.echo, self.result = session.root, session.echo, session.result

    def data(self) -> tuple[str, str]:
        data = self.s.step("Synthetic data: documents, charts, scenes, scans (mova data synth)",
                           lambda: generate(self.s.recipe("synth", SynthRecipe,
                                                          out=self.root / "data",
                                                          seed=self.seed)))
        train, test = str(data.train_manifest), str(data.test_manifest)
        self.echo(f"    {data.counts} -> {train}, {test}")
        return train, test

    def init(self) -> Path:
        def build() -> Path:
            model = build_tiny_mova(seed=self.seed)
            path = model.save_pretrained(self.root / "init")
            self.echo(f"    {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
                      f"parameters, pool: {', '.join(model.expert_names)} -> {path}")
            return path

        return self.s.step("A tiny MoVA of the real architectures, random init "
                           "(mova model init)", build)

    def features(self, train: str, init_path: Path) -> None:
        feats = self.s.features("Expert-feature cache on Ray Data, every expert (mova features)",
                                train, init_path)
        self.echo(f"    {feats.images} images -> {feats.cache}")

    def train(self, stage: str, init_from: Path, manifest: str, title: str) -> Any:
        trained = self.s.step(title, lambda: self.s.train(
            stage, f"demo-{stage}", init_from=init_from, manifest=manifest, output=stage,
            seed=self.seed))
        self.echo(f"    {trained.steps} steps, final loss {trained.final_loss:.3f} -> "
                  f"{trained.output}")
        return trained

    def labels(self, train: str, checkpoint: str) -> str:
        labelled = str(self.root / "data" / "train.labels")
        labels = self.s.step("Loss-driven routing labels with the pretrained model "
                             "(mova labels)",
                             lambda: run_labels(self.s.recipe(
                                 "labels", LabelsRecipe, manifest=train, checkpoint=checkpoint,
                                 output=labelled, cache=self.root / "features")))
        self.result.labels = dict(labels.activation)
        self.echo(labels.table())
        return labelled

    def evaluate(self, init_path: Path, trained: Path, test: str) -> None:
        def both() -> None:
            for name, checkpoint in (("untrained", init_path), ("trained", trained)):
                recipe = self.s.recipe(
                    "eval", EvalRecipe, run_name=f"eval-{name}", checkpoint=checkpoint,
                    benchmarks=[{"name": "synth", "path": test}],
                    output=self.root / "eval" / name)
                summary = run_eval(recipe)
                score = summary.scores["synth"]
                self.result.eval[name] = {
                    "score": score.score, "details": dict(score.details),
                    "questions": score.questions, "activation": summary.activation,
                    "report": summary.report, "mlflow_run_id": summary.mlflow_run_id}

        self.s.step("Evaluate the untrained and the trained model on the test split "
                    "(mova eval, Ray Data)", both)
        self.echo(eval_table(self.result))

    def serve(self, checkpoint: Path, test: str) -> None:
        sample = pick_question(test)
        max_tokens = int(self.s.plan.value("eval", "max_new_tokens"))

        def ask() -> None:
            recipe = self.s.recipe("serve", ServeRecipe, checkpoint=checkpoint,
                                   port=free_local_port())
            self.s.ray.serve_started = True
            self.result.served = ask_server(recipe, sample, max_tokens)

        self.s.step("Serve the trained model (mova serve) and ask it through the official "
                    "openai client", ask)
        self.echo(served_text(self.result.served))


def run_demo(out: str | Path = "outputs/demo", plan: Plan = FULL, *, seed: int = 0,
             serve: bool = True, echo: Callable[[str], None] = print) -> DemoResult:
    """Run the whole lifecycle into ``out``; returns what happened (also on the screen)."""
    session = DemoSession(out, plan, 9 if serve else 8, record="demo.json",
                          ray_prefix="mova-demo-ray-", echo=echo,
                          result=lambda root, uri: DemoResult(out=root, tracking_uri=uri))
    with session:
        demo = Lifecycle(session, seed)
        train, test = demo.data()
        init_path = demo.init()
        demo.features(train, init_path)
        pre = demo.train("pretrain", init_path, train,
                         "Pretrain the MoV-Adapter on Ray Train + DeepSpeed ZeRO-2, 2 workers "
                         "(mova train, stage pretrain)")
        labelled = demo.labels(train, pre.output)
        sft = demo.train("sft", Path(pre.output), labelled,
                         "SFT on the new labels: LLM + adapter, routing-instruction rows "
                         "included (mova train, stage sft)")
        demo.evaluate(init_path, Path(sft.output), test)
        if serve:
            demo.serve(Path(sft.output), test)
    echo(summary_text(session.result))
    return session.result
