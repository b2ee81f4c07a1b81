"""The app's ``/metrics`` sampled during a benchmark, turned into per-interval series and
drawn (matplotlib): the routing monitor's panels as a PNG, for where Grafana is not at hand.

Series (each a list of ``(seconds since start, value)``): requests per second by status,
routed requests per second by expert, queue depth and mean batch size by stage, mean stage
step time, mean time to first token, and the feature cache's hit rate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import matplotlib
import mlflow
from prometheus_client.parser import text_string_to_metric_families

from pipelines.serve.metrics import PREFIX

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402  (after choosing the headless backend)

log = logging.getLogger(__name__)

Sample = dict[tuple[str, tuple[tuple[str, str], ...]], float]
_KEEP = ("status", "expert", "stage", "result")


def parse(text: str) -> Sample:
    """Prometheus text -> {(sample name without Ray's prefix, our labels): value}, summed over
    replicas and nodes (only the ``mova_*`` families)."""
    out: Sample = defaultdict(float)
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(("ray_" + PREFIX, PREFIX)):
            continue
        for sample in family.samples:
            name = sample.name.removeprefix("ray_")
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k in _KEEP))
            out[(name, labels)] += sample.value
    return dict(out)


class Scraper(threading.Thread):
    """GET ``url`` (a Ray node's metrics agent, as Prometheus would) every ``period_s`` until
    stopped; keeps (elapsed seconds, parsed sample)."""

    def __init__(self, url: str, period_s: float = 2.0, headers: dict | None = None) -> None:
        super().__init__(daemon=True, name="metrics-scraper")
        self.url, self.period_s, self.headers = url, period_s, headers or {}
        self.samples: list[tuple[float, Sample]] = []
        self._stop_event = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        with httpx.Client(timeout=10, headers=self.headers) as http:
            while not self._stop_event.is_set():
                try:
                    text = http.get(self.url).text
                    self.samples.append((time.monotonic() - self.t0, parse(text)))
                except httpx.HTTPError as exc:
                    log.warning("metrics scrape failed: %r", exc)
                self._stop_event.wait(self.period_s)

    def stop(self) -> list[tuple[float, Sample]]:
        self._stop_event.set()
        self.join(timeout=15)
        return self.samples


def _by(sample: Sample, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (metric, labels), value in sample.items():
        if metric == name:
            out[dict(labels).get(label, "")] += value
    return out


def _rate(samples, name: str, label: str) -> dict[str, list[tuple[float, float]]]:
    """Per-second increase of a counter between consecutive samples, by ``label``."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (t0, a), (t1, b) in zip(samples, samples[1:], strict=False):
        before, after = _by(a, name, label), _by(b, name, label)
        for key in after:
            series[key].append((t1, max(0.0, after[key] - before.get(key, 0.0)) / (t1 - t0)))
    return dict(series)


def _mean(samples, name: str, label: str) -> dict[str, list[tuple[float, float]]]:
    """Mean of a histogram over each interval (its _sum and _count increases), by label."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (_, a), (t1, b) in zip(samples, samples[1:], strict=False):
        sums = {k: v - _by(a, f"{name}_sum", label).get(k, 0.0)
                for k, v in _by(b, f"{name}_sum", label).items()}
        counts = {k: v - _by(a, f"{name}_count", label).get(k, 0.0)
                  for k, v in _by(b, f"{name}_count", label).items()}
        for key, count in counts.items():
            if count > 0:
                series[key].append((t1, sums.get(key, 0.0) / count))
    return dict(series)


def _gauge(samples, name: str, label: str) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for t, sample in samples:
        for key, value in _by(sample, name, label).items():
            series[key].append((t, value))
    return dict(series)


def _hit_rate(samples) -> dict[str, list[tuple[float, float]]]:
    rates = _rate(samples, "mova_feature_cache_lookups_total", "result")
    hits, misses = dict(rates.get("hit", [])), dict(rates.get("miss", []))
    points = [(t, hits.get(t, 0.0) / (hits.get(t, 0.0) + misses[t]))
              for t in sorted(misses) if hits.get(t, 0.0) + misses[t] > 0]
    return {"hit rate": points} if points else {}


def series(samples: list[tuple[float, Sample]]) -> dict[str, dict[str, list]]:
    """Every panel's series from the scraped samples."""
    return {
        "requests/s by status": _rate(samples, "mova_requests_total", "status"),
        "routed requests/s by expert": _rate(samples, "mova_expert_routed_total", "expert"),
        "queue depth by stage": _gauge(samples, "mova_queue_depth", "stage"),
        "mean batch size by stage": _mean(samples, "mova_batch_size", "stage"),
        "mean step seconds by stage": _mean(samples, "mova_step_seconds", "stage"),
        "mean time to first token (s)": _mean(samples, "mova_time_to_first_token_seconds", ""),
        "feature cache hit rate": _hit_rate(samples),
    }


def plot(panels: dict[str, dict[str, list]], path: Path, title: str) -> Path:
    """Draw the panels into one PNG at ``path``."""
    fig, axes = plt.subplots(4, 2, figsize=(13, 13), constrained_layout=True)
    for ax, (name, lines) in zip(axes.flat, panels.items(), strict=False):
        for key, points in sorted(lines.items()):
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], label=key or name)
        ax.set_title(name)
        ax.set_xlabel("seconds")
        if lines:
            ax.legend(fontsize=7, ncol=2)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def log_to_mlflow(tracking_uri: str, experiment: str, png: Path, table: dict[str, Any]) -> str:
    """Log the plot and the result table to an MLflow run; returns its id."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="bench-serve-overload") as run:
        mlflow.log_artifact(str(png))
        mlflow.log_dict(table, "overload.json")
        for mode, row in table.items():
            for key, value in row.items():
                if isinstance(value, (int, float)):
                    mlflow.log_metric(f"{mode}.{key}", float(value))
        return run.info.run_id
