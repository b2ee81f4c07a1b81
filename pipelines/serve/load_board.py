"""The app's requests in flight, shared by its ingress replicas.

Each ingress admits requests by what it measured (:mod:`pipelines.serve.admission`), but the
replicas behind it (experts, adapter, LLM) are shared: requests admitted by one ingress slow
the answers of all. So every ingress reports its in-flight count to one small actor per app,
the :class:`LoadBoard`, at least every ``REPORT_S`` and as soon as its count changes, and
learns the others' sum in the reply. A replica that stops reporting (killed, stuck) drops out
after ``STALE_S``. The board belongs to the ingress replica that created it; when that one
dies, the next report creates it again, and until it answers each ingress counts only its own.
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray
from ray.serve._private.constants import SERVE_NAMESPACE

from pipelines.serve.admission import Tickets

log = logging.getLogger(__name__)

REPORT_S = 0.1  # an ingress reports at least this often
STALE_S = 1.0  # a report older than this no longer counts
BOARD_TIMEOUT_S = 1.0  # a report that takes longer failed


class Counts:
    """The latest in-flight count of each replica, with when it was reported."""

    def __init__(self, stale_s: float = STALE_S) -> None:
        self.stale_s = stale_s
        self._counts: dict[str, tuple[int, float]] = {}

    def report(self, replica: str, in_flight: int, now: float | None = None) -> int:
        """Record ``replica``'s count; the sum of the other replicas' fresh ones."""
        now = time.monotonic() if now is None else now
        self._counts[replica] = (in_flight, now)
        for name in [r for r, (_, at) in self._counts.items() if now - at > self.stale_s]:
            del self._counts[name]
        return sum(count for name, (count, _) in self._counts.items() if name != replica)


@ray.remote(num_cpus=0)
class LoadBoard:
    """One per app: the ingress replicas' in-flight counts."""

    def __init__(self) -> None:
        self.counts = Counts()

    async def report(self, replica: str, in_flight: int) -> int:
        return self.counts.report(replica, in_flight)


def _board(app: str):
    return LoadBoard.options(name=f"mova-load-board:{app}", namespace=SERVE_NAMESPACE,
                             get_if_exists=True).remote()


async def share_load(tickets: Tickets, app: str, replica: str) -> None:
    """Forever (until cancelled): report ``tickets``' count to ``app``'s board and set the
    peers' sum on ``tickets``. A slow board's last answer holds for ``STALE_S``; without an
    answer for longer, the peers count 0. This replica keeps its handle to the board (a
    named actor lives while a handle to it does) until the board dies; then it makes it
    again."""
    board, answered, warned = None, time.monotonic(), False
    while True:
        changed = tickets.changed()
        try:
            if board is None:
                board = await asyncio.to_thread(_board, app)
            others = await asyncio.wait_for(board.report.remote(replica, len(tickets)),
                                            BOARD_TIMEOUT_S)
            tickets.set_others(others)
            answered, warned = time.monotonic(), False
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            pass  # starting, or slow on a loaded machine
        except Exception as exc:  # it died (with the replica that made it): make it again
            board = None
            log.info("the app's load board is gone (%r); making it again", exc)
        if time.monotonic() - answered > STALE_S:
            tickets.set_others(0)
            if not warned:
                log.warning("the app's load board has not answered for %.0f s; counting only "
                            "this replica's requests until it does", STALE_S)
                warned = True
        try:
            await asyncio.wait_for(changed.wait(), REPORT_S)
        except TimeoutError:
            pass
