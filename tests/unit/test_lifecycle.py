"""The demo's plumbing without Ray: its output folder, progress lines and tables."""

from __future__ import annotations

import time

import pytest

from pipelines.common.tracking import Tracker
from pipelines.demo.console import EXPERIMENT, MARKER, TrainProgress, prepare_out
from pipelines.demo.report import DemoResult, eval_table


def test_prepare_out_replaces_an_earlier_demo_and_refuses_anything_else(tmp_path):
    out = prepare_out(tmp_path / "demo")
    (out / "stale.txt").write_text("from the last run")
    out = prepare_out(out)
    assert (out / MARKER).is_file() and not (out / "stale.txt").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and was not made by `mova demo`"):
        prepare_out(mine)
    assert (mine / "thesis.tex").read_text() == "keep me"


def test_progress_lines_come_from_the_runs_mlflow_metrics(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lines: list[str] = []
    progress = TrainProgress(uri, "demo-sft", 40, lines.append, every_s=0.05)
    assert progress.latest() is None  # no experiment yet
    tracker = Tracker(uri, EXPERIMENT, str(tmp_path / "art"), run_name="demo-sft",
                      system_metrics=False)
    try:
        with progress:
            tracker.log_metrics({"loss": 3.25}, step=4)
            tracker.flush()
            deadline = time.monotonic() + 20
            while not lines and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        tracker.mlflow.end_run()
    assert progress.latest() == (4, 3.25)
    assert lines[0] == "    step 4/40, loss 3.250"


def test_eval_table_lists_overall_and_every_domain():
    result = DemoResult(out="/o", tracking_uri="sqlite:////o/m.db", eval={
        "untrained": {"score": 0.0, "questions": 8,
                      "details": {"domain/charts": 0.0, "domain/scans": 0.0}},
        "trained": {"score": 0.25, "questions": 8,
                    "details": {"domain/charts": 0.0, "domain/scans": 0.5}}})
    table = eval_table(result)
    assert "| overall | 0.0% | 25.0% |" in table and "| scans | 0.0% | 50.0% |" in table
    assert result.trained_beats_untrained
