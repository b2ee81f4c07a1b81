"""MLflow tracking from rank 0: run creation/resume, batched metrics, artifacts."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipelines.common import storage

log = logging.getLogger(__name__)
FLUSH_EVERY_S = 10.0  # the longest a logged metric waits in the buffer


def default_tracking_uri(output_root: str) -> str:
    """A sqlite file beside the outputs (absolute: Ray workers run in other folders)."""
    return f"sqlite:///{Path(output_root).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None, output_root: str) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(
        output_root)


def tracking_target(configured: str | None, output: str, joins_cluster: bool = False
                    ) -> tuple[str, str]:
    """(tracking URI, artifact root) of a job writing ``output``: the configured or
    environment's tracking URI, else a sqlite file beside the output (under ./outputs when
    the output is remote). Artifacts go beside the output, on S3 when it is there. A remote
    output on a cluster means nodes may share no disk: a sqlite file (one node's) is refused
    there, naming the fix."""
    remote = storage.is_remote(output)
    root = str(Path("outputs").resolve()) if remote else storage.parent(storage.absolute(output))
    uri = resolve_tracking_uri(configured, root)
    if remote and joins_cluster and uri.startswith("sqlite:"):
        raise ValueError(f"output {output} is on object storage and the job joins a cluster, "
                         f"but MLflow would track into {uri}, a file on one node: set "
                         "mlflow.tracking_uri (or MLFLOW_TRACKING_URI) to an MLflow server, "
                         "e.g. http://mlflow:5000")
    artifacts = storage.join(storage.parent(output), "mlartifacts") if remote \
        else storage.join(root, "mlartifacts")
    return uri, artifacts


def open_run(mlflow: Any, output: str, run_name: str | None = None,
             joins_cluster: bool = False) -> Tracker:
    """A :class:`Tracker` for a job's ``mlflow:`` recipe section and its output."""
    uri, artifacts = tracking_target(mlflow.tracking_uri, output, joins_cluster)
    return Tracker(uri, mlflow.experiment, artifacts, mlflow.run_name or run_name,
                   system_metrics=mlflow.system_metrics)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested recipe -> {"a.b.c": "value"} for ``log_params`` (values cut to 500 chars)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:500]
    return out


class Tracker:
    """One MLflow run; metrics are buffered and sent in batches (at least every
    ``FLUSH_EVERY_S``)."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: str,
                 run_name: str | None, run_id: str | None = None,
                 system_metrics: bool = True) -> None:
        self.mlflow = mlflow
        # The fluent run (it carries the system-metrics thread) needs the global tracking URI,
        # and mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI. Both are put back in
        # end(): a later job of this process (or a Ray started from it) must not inherit this
        # run's store as if a user had configured it.
        self._previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(tracking_uri)
        try:
            self.client = MlflowClient(tracking_uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                exp_id = self.client.create_experiment(
                    experiment, artifact_location=_artifact_location(tracking_uri, artifact_root))
            else:
                exp_id = exp.experiment_id
            self.run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id,
                                        run_name=None if run_id else run_name,
                                        log_system_metrics=system_metrics)
        except BaseException:
            mlflow.set_tracking_uri(self._previous_uri)
            raise
        self.run_id = self.run.info.run_id
        self.tracking_uri = tracking_uri
        self.experiment_id = self.run.info.experiment_id
        self._buffer: list = []
        self._flushed_ms = int(time.time() * 1000)

    def log_params(self, params: dict[str, str]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        # batched writes, but never older than FLUSH_EVERY_S: live views (the MLflow UI, the
        # demo's progress lines) see each step soon after it happens
        if len(self._buffer) >= 200 or now - self._flushed_ms >= FLUSH_EVERY_S * 1000:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._buffer), 500):
            self.client.log_batch(self.run_id, metrics=self._buffer[i:i + 500])
        self._buffer = []
        self._flushed_ms = int(time.time() * 1000)

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, local_dir, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, local_file: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, local_file, artifact_path)

    def log_parts(self, folder: str, artifact_path: str, max_parts: int = 8) -> int:
        """Copy the first ``max_parts`` parts of a published output folder (local or s3://,
        see ``pipelines.common.manifests.parts``) into the run; the rest stay where they are
        (a pointer file says where). Returns how many were copied."""
        listing = json.loads(storage.read_text(storage.join(folder, "_SUCCESS")))
        parts = listing["parts"][:max_parts]
        with tempfile.TemporaryDirectory(prefix="mova-parts-") as tmp:
            for name in parts:
                (Path(tmp) / name).write_bytes(storage.read_bytes(storage.join(folder, name)))
            (Path(tmp) / "LOCATION.txt").write_text(
                f"{folder}: {len(listing['parts'])} part(s), {listing['rows']} row(s); "
                f"{len(parts)} copied here\n")
            self.client.log_artifacts(self.run_id, tmp, artifact_path)
        return len(parts)

    def end(self, status: str = "FINISHED") -> None:
        try:
            self.flush()
        finally:
            self.mlflow.end_run(status=status)
            self.mlflow.set_tracking_uri(self._previous_uri)


def _artifact_location(tracking_uri: str, artifact_root: str) -> str | None:
    """Explicit artifact location for file-based stores (the default would be the CWD)."""
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return None
    if artifact_root.startswith("s3://"):
        return artifact_root
    return Path(artifact_root).resolve().as_uri()
