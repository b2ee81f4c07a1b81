"""The Grafana dashboard in cluster/grafana reads only families the app exports, with their
labels, and covers what an operator watches (status, routing, queues, batches, latency,
the feature cache)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipelines.serve.metrics import _SPECS

DASHBOARD = Path(__file__).resolve().parents[2] / "cluster" / "grafana" / "mova-serving.json"
SERVE_TAGS = {"deployment", "replica", "application", "route"}  # ray.serve.metrics adds them
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
NEEDED = {"requests", "expert_routed", "queue_depth", "batch_size", "step_seconds",
          "time_to_first_token_seconds", "request_seconds", "feature_cache_lookups"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def _family(series: str) -> tuple[str, str]:
    """(family name, its kind) of an exported series name."""
    for name, (kind, *_rest) in _SPECS.items():
        for suffix in SUFFIXES[kind]:
            if series == f"ray_mova_{name}{suffix}":
                return name, kind
    raise AssertionError(f"{series} is not a series the app exports")


def test_every_query_reads_exported_series_and_their_labels(dashboard):
    used = set()
    for expr in _exprs(dashboard):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        for series, selector in re.findall(r"(ray_mova_\w+)(\{[^}]*\})?", expr):
            name, kind = _family(series)
            used.add(name)
            labels = set(_SPECS[name][2]) | SERVE_TAGS | ({"le"} if kind == "histogram" else set())
            for label in re.findall(r"(\w+)\s*=~?", selector):
                assert label in labels, f"{series} has no label {label!r}: {expr}"
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            series_labels = set().union(*(set(_SPECS[_family(s)[0]][2]) for s in
                                          re.findall(r"ray_mova_\w+", expr)))
            for label in (g.strip() for g in group.split(",")):
                assert label in series_labels | SERVE_TAGS | {"le"}, f"by {label}: {expr}"
    assert NEEDED <= used, f"no panel for {sorted(NEEDED - used)}"


def test_the_dashboard_is_well_formed(dashboard):
    panels = dashboard["panels"]
    assert dashboard["uid"] and dashboard["schemaVersion"] >= 30
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {p['title']!r} overlaps another"
        assert g["x"] + g["w"] <= 24
        cells |= area
        assert p["targets"] and all(t["refId"] and t["expr"] for t in p["targets"])
    names = {v["name"] for v in dashboard["templating"]["list"]}
    for expr in _exprs(dashboard):
        assert set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval"} <= names, expr
