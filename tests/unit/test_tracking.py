"""MLflow tracker: batched metric writes that still reach the store within FLUSH_EVERY_S."""

from __future__ import annotations

import pytest

import pipelines.common.tracking as tracking


@pytest.fixture
def tracker(tmp_path):
    t = tracking.Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "unit", str(tmp_path / "art"),
                         run_name="r", system_metrics=False)
    yield t
    t.end()


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


def test_a_finished_run_leaves_no_tracking_uri_behind(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; once the run ends, the next job in
    this process must again get its own default store (this leaked across tests once)."""
    import os

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'a.db'}"
    t = tracking.Tracker(uri, "unit", str(tmp_path / "art"), run_name="r", system_metrics=False)
    assert os.environ["MLFLOW_TRACKING_URI"] == uri  # a child process of the run would log there
    t.end()
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert tracking.resolve_tracking_uri(None, str(tmp_path / "b")) == \
        tracking.default_tracking_uri(str(tmp_path / "b"))

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # the user's own
    t = tracking.Tracker(uri, "unit", str(tmp_path / "art"), run_name="r2", system_metrics=False)
    t.end()
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
