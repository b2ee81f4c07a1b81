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

import base64
import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MARKER = ".mova-demo"
EXPERIMENT = "mova-demo"


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


@dataclass
class DemoResult:
    """What the demo did; ``eval`` maps "untrained"/"trained" to per-benchmark scores."""

    out: str
    tracking_uri: str
    steps_seconds: dict[str, float] = field(default_factory=dict)
    eval: dict[str, dict[str, Any]] = field(default_factory=dict)
    served: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, float] = field(default_factory=dict)
    stopped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def trained_beats_untrained(self) -> bool:
        return self.eval["trained"]["score"] > self.eval["untrained"]["score"]


class Steps:
    """Numbered, timed steps with a progress line each."""

    def __init__(self, total: int, result: DemoResult, echo: Callable[[str], None]) -> None:
        self.total, self.result, self.echo, self.n = total, result, echo, 0

    def run(self, title: str, fn: Callable[[], Any]) -> Any:
        self.n += 1
        self.echo(f"\n[{self.n}/{self.total}] {title} ...")
        start = time.perf_counter()
        value = fn()
        took = time.perf_counter() - start
        self.result.steps_seconds[title] = round(took, 1)
        self.echo(f"[{self.n}/{self.total}] done in {took:.1f} s")
        return value


class TrainProgress:
    """Echo a training run's latest step and loss while it runs, read from its MLflow run
    (the workers' own output stays in the log files, so this is the progress line)."""

    def __init__(self, tracking_uri: str, run_name: str, total: int,
                 echo: Callable[[str], None], every_s: float = 10.0) -> None:
        self.tracking_uri, self.run_name, self.total = tracking_uri, run_name, total
        self.echo, self.every_s = echo, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name=f"progress-{run_name}",
                                        daemon=True)
        self._last = -1

    def __enter__(self) -> TrainProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def latest(self) -> tuple[int, float] | None:
        """(step, loss) of the newest run named ``run_name``, or None before it logs any."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            return None
        runs = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.mlflow.runName = '{self.run_name}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            return None
        history = client.get_metric_history(runs[0].info.run_id, "loss")
        if not history:
            return None
        last = max(history, key=lambda m: m.step)
        return last.step, last.value

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                latest = self.latest()
            except Exception as exc:  # progress is best effort; training goes on
                log.debug("progress poll failed: %s", exc)
                continue
            if latest and latest[0] != self._last:
                self._last = latest[0]
                self.echo(f"    step {latest[0]}/{self.total}, loss {latest[1]:.3f}")


def prepare_out(out: Path) -> Path:
    """Use ``out`` for a fresh run: an earlier demo's folder (marked) is replaced, any other
    non-empty folder is refused so nothing of the user's is deleted."""
    out = out.expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise ValueError(f"demo output folder {out} is not empty and was not made by "
                             "`mova demo`; choose another with --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `mova demo`; replaced by the next run\n")
    return out


def _train_recipe(plan: DemoPlan, out: Path, stage: str, init_from: Path, manifest: str,
                  steps: int, tracking_uri: str):
    from pipelines.recipes import RayConfig
    from pipelines.train_recipe import DeepSpeedConfig, MlflowConfig, OptimConfig, TrainRecipe

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
    from pipelines.train import run_train

    recipe = _train_recipe(plan, out, stage, init_from, manifest, steps, tracking_uri)
    with TrainProgress(tracking_uri, recipe.mlflow.run_name, steps, echo):
        return run_train(recipe)


def _eval(plan: DemoPlan, out: Path, name: str, checkpoint: Path, test: str,
          tracking_uri: str) -> dict[str, Any]:
    from pipelines.eval_recipe import BenchmarkSpec, EvalRecipe
    from pipelines.evaluate import run_eval
    from pipelines.recipes import RayConfig
    from pipelines.train_recipe import MlflowConfig

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


def _image_uri(path: str) -> str:
    from PIL import Image

    buf = io.BytesIO()
    with Image.open(path) as image:
        image.convert("RGB").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pick_question(test: str) -> dict[str, Any]:
    """The first chart question of the test split (a row with an image and an answer)."""
    rows = [json.loads(line) for line in Path(test).read_text().splitlines() if line.strip()]
    row = next((r for r in rows if r.get("domain") == "charts"), rows[0])
    question = next(t["value"] for t in row["conversations"] if t["from"] == "human")
    answer = next(t["value"] for t in reversed(row["conversations"]) if t["from"] == "gpt")
    image = Path(test).parent / row["image"]
    return {"image": str(image), "question": question.replace("<image>", "").strip(),
            "answer": answer, "domain": row.get("domain")}


def _ask_server(checkpoint: Path, sample: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    import openai

    from pipelines.ray_utils import free_local_port
    from pipelines.recipes import load_recipe
    from pipelines.serve.app import start
    from pipelines.serve.recipe import ServeRecipe

    recipe = load_recipe(ServeRecipe, None, [f"checkpoint={checkpoint}",
                                             f"port={free_local_port()}",
                                             "experts.default.autoscaling.min_replicas=0"])
    url = start(recipe)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="not-needed", max_retries=2,
                           timeout=120)
    message = {"role": "user", "content": [
        {"type": "text", "text": sample["question"]},
        {"type": "image_url", "image_url": {"url": _image_uri(sample["image"])}}]}
    reply = client.chat.completions.create(model=recipe.model_name, messages=[message],
                                           max_tokens=max_tokens, temperature=0)
    ext = (reply.model_extra or {}).get("mova", {})
    return {"url": f"{url}/v1", "question": sample["question"], "image": sample["image"],
            "true_answer": sample["answer"], "answer": reply.choices[0].message.content,
            "experts": ext.get("experts", []), "routing_reply": ext.get("routing_reply"),
            "gate_weights": ext.get("gate_weights", []), "pool": ext.get("pool", []),
            "usage": reply.usage.model_dump() if reply.usage else {}}


def _ray_processes() -> int:
    """How many processes the local Ray runs (for the report of what was stopped)."""
    import psutil

    me = psutil.Process()
    return len(me.children(recursive=True))


def run_demo(out: str | Path = "outputs/demo", plan: DemoPlan | None = None, *,
             serve: bool = True, echo: Callable[[str], None] = print) -> DemoResult:
    """Run the whole lifecycle into ``out``; returns what happened (also on the screen)."""

    from mova.factory import build_tiny_mova
    from pipelines.data.synth import SynthConfig, generate
    from pipelines.features import run_features
    from pipelines.labels import LabelsRecipe, run_labels
    from pipelines.recipes import FeaturesRecipe, RayConfig
    from pipelines.train_recipe import MlflowConfig

    plan = plan or DemoPlan()
    quiet_screen()
    start = time.perf_counter()
    root = prepare_out(Path(out))
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    result = DemoResult(out=str(root), tracking_uri=tracking_uri)
    steps = Steps(9 if serve else 8, result, echo)
    with DemoRay(root, "mova-demo-ray-", echo) as local_ray:
        data = steps.run("Synthetic data: documents, charts, scenes, scans (mova data synth)",
                         lambda: generate(SynthConfig(
                             out=str(root / "data"), seed=plan.seed, per_domain=plan.per_domain,
                             test_per_domain=plan.test_per_domain, image_size=plan.image_size,
                             routing_samples=plan.routing_samples)))
        train, test = str(data.train_manifest), str(data.test_manifest)
        echo(f"    {data.counts} -> {train}, {test}")

        def init() -> Any:
            model = build_tiny_mova(seed=plan.seed)
            path = model.save_pretrained(root / "init")
            echo(f"    {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                 f"pool: {', '.join(model.expert_names)} -> {path}")
            return path

        init_path = steps.run("A tiny MoVA of the real architectures, random init "
                              "(mova model init)", init)
        cpus = local_ray.start()
        echo(f"    local Ray started ({cpus:g} CPUs); worker logs go to {root / 'ray-logs'}")
        feats = steps.run("Expert-feature cache on Ray Data, every expert (mova features)",
                          lambda: run_features(FeaturesRecipe(
                              manifest=train, checkpoint=str(init_path),
                              cache=str(root / "features"), experts="all", dtype="float32",
                              batch_size=32, cpus_per_worker=1.0,
                              ray=RayConfig(address="local")).validate()))
        echo(f"    {feats.images} images -> {feats.cache}")
        pre = steps.run("Pretrain the MoV-Adapter on Ray Train + DeepSpeed ZeRO-2, 2 workers "
                        "(mova train, stage pretrain)",
                        lambda: _train(plan, root, "pretrain", init_path, train,
                                       plan.pretrain_steps, tracking_uri, echo))
        echo(f"    {pre.steps} steps, final loss {pre.final_loss:.3f} -> {pre.output}")
        labelled = str(root / "data" / "train.labels.jsonl")
        labels = steps.run("Loss-driven routing labels with the pretrained model (mova labels)",
                           lambda: run_labels(LabelsRecipe(
                               manifest=train, checkpoint=pre.output, output=labelled,
                               cache=str(root / "features"), batch_size=16,
                               mlflow=MlflowConfig(tracking_uri=tracking_uri,
                                                   experiment=EXPERIMENT, run_name="labels",
                                                   system_metrics=False),
                               ray=RayConfig(address="local")).validate()))
        result.labels = dict(labels.activation)
        echo(labels.table())
        sft = steps.run("SFT on the new labels: LLM + adapter, routing-instruction rows "
                        "included (mova train, stage sft)",
                        lambda: _train(plan, root, "sft", Path(pre.output), labelled,
                                       plan.sft_steps, tracking_uri, echo))
        echo(f"    {sft.steps} steps, final loss {sft.final_loss:.3f} -> {sft.output}")

        def evaluate() -> None:
            result.eval["untrained"] = _eval(plan, root, "untrained", init_path, test,
                                             tracking_uri)
            result.eval["trained"] = _eval(plan, root, "trained", Path(sft.output), test,
                                           tracking_uri)

        steps.run("Evaluate the untrained and the trained model on the test split "
                  "(mova eval, Ray Data)", evaluate)
        echo(eval_table(result))
        if serve:
            sample = _pick_question(test)

            def ask() -> None:
                local_ray.serve_started = True
                result.served = _ask_server(Path(sft.output), sample, plan.max_new_tokens)

            steps.run("Serve the trained model (mova serve) and ask it through the official "
                      "openai client", ask)
            echo(served_text(result.served))
    result.stopped = local_ray.stopped
    result.seconds = time.perf_counter() - start
    (root / "demo.json").write_text(json.dumps(dataclasses.asdict(result), indent=2,
                                               default=str))
    echo(summary_text(result))
    return result


class DemoRay:
    """A demo's private local Ray, as a context: started by :meth:`start`, and on the way out
    (also on Ctrl-C or an error) stopped with its Serve app, its worker logs copied to
    ``<root>/ray-logs`` and its temp dir removed; ``stopped`` says what was stopped."""

    def __init__(self, root: Path, prefix: str, echo: Callable[[str], None]) -> None:
        self.root, self.echo = root, echo
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.serve_started = False
        self.stopped: list[str] = []

    def start(self) -> float:
        """Start the local Ray (all CPUs, worker output to log files only); its CPU count."""
        import ray

        from pipelines.ray_utils import init_ray

        init_ray("local", num_cpus=os.cpu_count() or 2, temp_dir=str(self.dir),
                 log_to_driver=False)
        quiet_ray()
        return ray.cluster_resources().get("CPU", 0)

    def __enter__(self) -> DemoRay:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.stopped = stop_ray(self.serve_started, self.echo)
        keep_logs(self.dir, self.root / "ray-logs")
        shutil.rmtree(self.dir, ignore_errors=True)
        if exc_type is not None:  # say what was cleaned up before the exception propagates
            self.echo("Stopped: " + ("; ".join(self.stopped) or "nothing was running") +
                      f". Outputs so far: {self.root}")


def quiet_screen() -> None:
    """One line per step on the screen: no per-batch progress bars from Ray Data or
    transformers (worker output is kept in ``ray-logs/`` instead of echoed)."""
    import transformers

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    transformers.utils.logging.disable_progress_bar()


def quiet_ray() -> None:
    """After Ray is up (ray.init and ray.data configure their loggers): warnings only."""
    import ray.data  # noqa: F401  (configures the ray.data logger, which this then quiets)

    for name in ("ray", "ray.data", "ray.train", "ray.serve", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def keep_logs(ray_dir: Path, dest: Path) -> None:
    """Copy the session's worker logs out of Ray's temp dir before it is removed."""
    logs = ray_dir / "session_latest" / "logs"
    if logs.is_dir():
        shutil.copytree(logs, dest, dirs_exist_ok=True, ignore_dangling_symlinks=True,
                        ignore=shutil.ignore_patterns("*.sock", "old"))


def stop_ray(serve_started: bool, echo: Callable[[str], None]) -> list[str]:
    """Stop what the demo started: the Serve app, then the local Ray (every process of it)."""
    import ray

    stopped = []
    if serve_started:
        from ray import serve

        try:
            serve.shutdown()
            stopped.append("the Serve app (HTTP proxy, controller and every replica)")
        except Exception as exc:  # keep going: Ray itself must still be stopped
            log.warning("serve shutdown failed: %s", exc)
    if ray.is_initialized():
        before = _ray_processes()
        ray.shutdown()
        stopped.append(f"the private local Ray ({before} processes; "
                       f"{_ray_processes()} left)")
    for line in stopped:
        echo(f"    stopped {line}")
    return stopped


def eval_table(result: DemoResult) -> str:
    """Untrained vs trained, overall and per domain, as a markdown table."""
    rows = [("overall", "score")]
    details = result.eval["trained"]["details"]
    rows += [(key.split("/", 1)[-1], key) for key in sorted(details) if key.startswith("domain/")]
    lines = ["| synthetic test split | untrained | trained |", "|---|---|---|"]
    for label, key in rows:
        vals = []
        for name in ("untrained", "trained"):
            e = result.eval[name]
            vals.append(e["score"] if key == "score" else e["details"].get(key, float("nan")))
        lines.append(f"| {label} | {100 * vals[0]:.1f}% | {100 * vals[1]:.1f}% |")
    n = result.eval["trained"]["questions"]
    return "\n".join(lines) + f"\n({n} questions, greedy decoding, the LLM routes itself)"


def served_text(s: dict[str, Any]) -> str:
    pool = s.get("pool", [])
    gates = "; ".join(
        f"block {b}: " + ", ".join(f"{n}={w:.2f}" for n, w in zip(pool, row, strict=False)
                                   if w > 0) for b, row in enumerate(s.get("gate_weights", [])))
    return "\n".join([
        f"    endpoint      : {s['url']} (POST /chat/completions)",
        f"    image         : {s['image']}",
        f"    question      : {s['question']}   (true answer: {s['true_answer']})",
        f"    routing reply : {s['routing_reply']!r} -> experts {s['experts'] or 'none'}",
        f"    gate weights  : {gates or 'no expert fused'}",
        f"    answer        : {s['answer']!r}"])


def summary_text(r: DemoResult) -> str:
    lines = [f"\nThe MoVA demo finished in {r.seconds:.0f} s. Outputs under {r.out}:",
             "  data/ (synthetic manifests, new labels), features/ (expert cache), init/, "
             "pretrain/, sft/ (checkpoints), eval/ (predictions, scores), ray-logs/, "
             "demo.json"]
    if r.eval:
        verdict = "beats" if r.trained_beats_untrained else "does NOT beat"
        lines.append(f"  The trained model {verdict} the untrained one on the synthetic test "
                     f"split: {100 * r.eval['trained']['score']:.1f}% vs "
                     f"{100 * r.eval['untrained']['score']:.1f}%.")
    lines += [f"  MLflow runs (experiment mova-demo): {r.tracking_uri}",
              f"  Open the MLflow UI: mlflow ui --backend-store-uri {r.tracking_uri} "
              "(then http://127.0.0.1:5000)"]
    if r.stopped:
        lines.append("  Stopped: " + "; ".join(r.stopped) + ".")
    lines.append("  Re-run any step by hand: jobs/*.yaml point at outputs/demo "
                 "(e.g. mova serve --config jobs/serve.yaml checkpoint=outputs/demo/sft).")
    return "\n".join(lines)
