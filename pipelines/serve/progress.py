"""Stuck or slow? A worker thread past its requests' deadline is judged by the CPU it uses.

A batch or decode step that runs past the latest deadline it serves plus ``stall_grace_s`` is
either stuck (a thread blocked forever, e.g. in a ``ray.get`` that never returns, uses no CPU)
or slow (a loaded machine: it computes, only later than hoped). Restarting a slow replica
throws its work away and, under load, starts a restart storm; so only a thread that used
(almost) no CPU over the last grace period is stuck. A thread that keeps computing for
``HARD_FACTOR`` grace periods past the deadline is treated as stuck too (a spinning loop).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

MIN_CPU_SHARE = 0.01  # a thread that used less of a core than this over a grace period is stuck
HARD_FACTOR = 6  # past the deadline by this many grace periods: stuck, whatever it does


def thread_cpu_seconds(ident: int | None) -> float:
    """CPU seconds used by thread ``ident`` (the process's, where a thread's cannot be read)."""
    if ident is not None:
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(ident))
        except (AttributeError, OSError):  # not Linux, or the thread is gone
            pass
    return time.process_time()


class StallJudge:
    """Judges one worker thread: :meth:`started` at each batch or step, :meth:`stuck` when
    one has run past its deadline + ``grace_s``."""

    def __init__(self, grace_s: float, cpu: Callable[[], float] | None = None) -> None:
        self.grace_s = grace_s
        self.ident: int | None = None
        self._cpu = cpu  # what to judge instead of a thread (e.g. an engine's processes)
        self._sample: tuple[float, float] | None = None  # (time, thread CPU) last looked at

    def bind(self, ident: int | None = None) -> None:
        """The thread to judge (default: the calling one)."""
        self.ident = threading.get_ident() if ident is None else ident

    def started(self) -> None:
        """A batch or step began (call from any thread)."""
        self._sample = (time.monotonic(), self._cpu_seconds())

    def _cpu_seconds(self) -> float:
        return self._cpu() if self._cpu is not None else thread_cpu_seconds(self.ident)

    def stuck(self, overdue_s: float) -> str | None:
        """The reason the work is stuck, or None when it is still computing. ``overdue_s``:
        how far past its deadline + grace it is. Looked at again, it judges the time since."""
        now, cpu = time.monotonic(), self._cpu_seconds()
        if overdue_s > (HARD_FACTOR - 1) * self.grace_s:
            return (f"still running {overdue_s + self.grace_s:.1f} s past its deadline "
                    f"({HARD_FACTOR} x stall_grace_s)")
        if self._sample is None:
            self._sample = (now, cpu)
        then, cpu_then = self._sample
        elapsed = now - then
        if elapsed < self.grace_s * 0.5:  # judged lately and found computing
            return None
        self._sample = (now, cpu)
        if cpu - cpu_then < MIN_CPU_SHARE * elapsed:
            what = "its thread" if self._cpu is None else "it"
            return f"no progress: {what} used {cpu - cpu_then:.3f} CPU s in {elapsed:.1f} s"
        return None
