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


def test_tracking_target_beside_the_output_and_on_s3(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri, artifacts = tracking.tracking_target(None, str(tmp_path / "runs" / "model"))
    assert uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert artifacts == str(tmp_path / "runs" / "mlartifacts")
    # a remote output: artifacts beside it on S3; the sqlite store is local to this machine
    uri, artifacts = tracking.tracking_target(None, "s3://bucket/exp/model")
    assert artifacts == "s3://bucket/exp/mlartifacts"
    assert uri == f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    # ... which a cluster whose nodes may share no disk cannot use
    with pytest.raises(ValueError, match="mlflow.tracking_uri.*MLflow server"):
        tracking.tracking_target(None, "s3://bucket/exp/model", joins_cluster=True)
    uri, _ = tracking.tracking_target("http://mlflow:5000", "s3://bucket/exp/model",
                                      joins_cluster=True)
    assert uri == "http://mlflow:5000"
