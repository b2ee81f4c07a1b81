"""The demo's tables and closing text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipelines.demo.session import RunRecord


@dataclass
class DemoResult(RunRecord):
    """What the demo did; ``eval`` maps "untrained"/"trained" to per-benchmark scores."""

    eval: dict[str, dict[str, Any]] = field(default_factory=dict)
    served: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, float] = field(default_factory=dict)

    @property
    def trained_beats_untrained(self) -> bool:
        return self.eval["trained"]["score"] > self.eval["untrained"]["score"]


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
        f"    endpoint      : {s['url']} (POST /chat/completions, LLM on "
        f"{s.get('engine', '?')})",
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
