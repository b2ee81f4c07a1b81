"""What both demos show and how they clean up: numbered steps, training progress read from
MLflow, the output folder, and the private local Ray they start and always stop."""

from __future__ import annotations

import _thread
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import ray
import ray.data
import ray.serve
import transformers
from mlflow import MlflowClient
from ray import serve

from pipelines.common.ray_init import init_ray

log = logging.getLogger(__name__)

MARKER = ".mova-demo"
EXPERIMENT = "mova-demo"


class Steps:
    """Numbered, timed steps with a progress line each."""

    def __init__(self, total: int, result: Any, echo: Callable[[str], None]) -> None:
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


def _ray_processes() -> int:
    """How many processes the local Ray runs (for the report of what was stopped)."""
    me = psutil.Process()
    return len(me.children(recursive=True))


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
        init_ray("local", num_cpus=os.cpu_count() or 2, temp_dir=str(self.dir),
                 log_to_driver=False)

        quiet_ray()
        return ray.cluster_resources().get("CPU", 0)

    def __enter__(self) -> DemoRay:
        self.interrupts = Interrupts().install()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.interrupts.uninstall()  # no re-sent Ctrl-C while Ray is being stopped
        self.stopped = stop_ray(self.serve_started, self.echo)
        keep_logs(self.dir, self.root / "ray-logs")
        shutil.rmtree(self.dir, ignore_errors=True)
        if exc_type is not None:  # say what was cleaned up before the exception propagates
            self.echo("Stopped: " + ("; ".join(self.stopped) or "nothing was running") +
                      f". Outputs so far: {self.root}")


class Interrupts:
    """Ctrl-C that cannot get lost. Python swallows a ``KeyboardInterrupt`` raised while it
    runs a finaliser or a callback ("Exception ignored in ..."), and a driver busy in Ray
    runs many of them; an interrupt lost there would leave the demo running. After the first
    SIGINT this re-raises it in the main thread every ``resend_s`` until :meth:`uninstall`
    (called as the demo starts cleaning up)."""

    def __init__(self, resend_s: float = 3.0) -> None:
        self.resend_s = resend_s
        self.done = threading.Event()
        self.previous: Any = None
        self.resender: threading.Thread | None = None

    def install(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def uninstall(self) -> None:
        self.done.set()
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def _on_sigint(self, signum: int, frame: object) -> None:
        if self.resender is None:
            self.resender = threading.Thread(target=self._resend, name="mova-interrupts",
                                             daemon=True)
            self.resender.start()
        raise KeyboardInterrupt

    def _resend(self) -> None:
        while not self.done.wait(self.resend_s):
            log.info("Ctrl-C not acted on yet: raising it again")
            _thread.interrupt_main(signal.SIGINT)


def quiet_screen() -> None:
    """One line per step on the screen: no per-batch progress bars from Ray Data or
    transformers (worker output is kept in ``ray-logs/`` instead of echoed)."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # e.g. its database set-up notes


def quiet_ray() -> None:
    """After Ray is up (ray.init and ray.data configure their loggers): warnings only."""
    for name in ("ray", "ray.data", "ray.train", "ray.serve", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Its notice that progress bars are off: the demo turned them off on purpose.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def keep_logs(ray_dir: Path, dest: Path) -> None:
    """Copy the session's worker logs out of Ray's temp dir before it is removed."""
    logs = ray_dir / "session_latest" / "logs"
    if logs.is_dir():
        shutil.copytree(logs, dest, dirs_exist_ok=True, ignore_dangling_symlinks=True,
                        ignore=shutil.ignore_patterns("*.sock", "old"))


def stop_ray(serve_started: bool, echo: Callable[[str], None]) -> list[str]:
    """Stop what the demo started: the Serve app, then the local Ray (every process of it)."""
    stopped = []
    if serve_started:
        try:
            # The apps' replicas drain and stop; the Serve system actors go with Ray below
            # (serve.shutdown() would kill its controller mid-call, which Ray reports).
            for app in serve.status().applications:
                serve.delete(app)
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
