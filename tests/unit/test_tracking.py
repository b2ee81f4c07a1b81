"""MLflow tracker: batched metric writes that still reach the store within FLUSH_EVERY_S."""

from __future__ import annotations

import pytest

import pipelines.tracking as tracking


@pytest.fixture
def tracker(tmp_path):
    t = tracking.Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "unit", str(tmp_path / "art"),
                         run_name="r", system_metrics=False)
    yield t
    t.mlflow.end_run()


def _losses(t: tracking.Tracker) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in t.client.get_metric_history(t.run_id, "loss")]


def test_metrics_wait_in_the_buffer_until_it_is_due(tracker, monkeypatch):
    monkeypatch.setattr(tracking, "FLUSH_EVERY_S", 3600.0)
    tracker.log_metrics({"loss": 2.0}, step=1)
    assert _losses(tracker) == []  # batched, not yet written
    tracker.flush()
    assert _losses(tracker) == [(1, 2.0)]


def test_a_quiet_run_still_shows_each_step_soon(tracker, monkeypatch):
    monkeypatch.setattr(tracking, "FLUSH_EVERY_S", 0.0)
    tracker.log_metrics({"loss": 2.0}, step=1)
    tracker.log_metrics({"loss": 1.5}, step=2)
    assert _losses(tracker) == [(1, 2.0), (2, 1.5)]
