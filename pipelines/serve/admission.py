"""Admission at the ingress: in-flight slots, and refusing at once what cannot finish in time.

A request that waits its whole deadline and then gets a 408 has cost the client that time and
the app its work. :class:`Admission` estimates, from what this replica has measured, when a
new request would finish, and the ingress refuses it at once (503 with ``Retry-After``) when
that is past its deadline. The estimate is Little's law over the replica's busy time: with
``X`` answers per busy second lately and ``n`` requests in flight, a new one finishes after
about ``(n + 1) / X`` seconds. Busy time, not wall time, so an idle spell does not make the
replica look slow; and a replica that stays busy without answering looks ever slower, so a
stall is refused too rather than queued into.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable

from pipelines.serve.errors import APIError, overloaded
from pipelines.serve.metrics import metric

log = logging.getLogger(__name__)

WINDOW_S = 30.0  # how far back answers and busy time count
MIN_ANSWERS = 4  # answers in the window before the estimate is trusted
MIN_BUSY_S = 10.0  # busy this long without an answer (and too few to estimate): stalled
MAX_RETRY_AFTER_S = 30


def _finish_s(rate: float, in_flight: int) -> float:
    """Little's law: one more request after ``in_flight`` finishes in this many seconds."""
    return math.inf if rate == 0 else (in_flight + 1) / rate


class Admission:
    """Throughput over busy time, and the wait it implies for one more request."""

    def __init__(self, window_s: float = WINDOW_S, min_answers: int = MIN_ANSWERS,
                 min_busy_s: float = MIN_BUSY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self.min_answers, self.min_busy_s = window_s, min_answers, min_busy_s
        self.clock = clock
        self._answers: deque[float] = deque()  # when each recent answer finished
        self._spells: deque[tuple[float, float]] = deque()  # closed busy spells (start, end)
        self._busy_since: float | None = None

    def in_flight_changed(self, before: int, after: int) -> None:
        """Call when the number of requests in flight goes from ``before`` to ``after``."""
        now = self.clock()
        if before == 0 and after > 0:
            self._busy_since = now
        elif before > 0 and after == 0 and self._busy_since is not None:
            self._spells.append((self._busy_since, now))
            self._busy_since = None
        self._trim(now)

    def answered(self) -> None:
        """A request finished with its answer."""
        now = self.clock()
        self._answers.append(now)
        self._trim(now)

    def _trim(self, now: float) -> None:
        start = now - self.window_s
        while self._answers and self._answers[0] < start:
            self._answers.popleft()
        while self._spells and self._spells[0][1] < start:
            self._spells.popleft()

    def busy_seconds(self) -> float:
        now = self.clock()
        start = now - self.window_s
        busy = sum(end - max(begin, start) for begin, end in self._spells if end > start)
        if self._busy_since is not None:
            busy += now - max(self._busy_since, start)
        return busy

    def throughput(self) -> float | None:
        """Answers per busy second in the window; 0 when the replica has been busy for
        ``min_busy_s`` without an answer (stalled); None until there is enough to go on."""
        now = self.clock()
        self._trim(now)
        if len(self._answers) >= self.min_answers:
            busy = self.busy_seconds()
            return len(self._answers) / busy if busy > 0 else None
        if self._busy_since is not None:  # only the current spell: a past stall has ended
            quiet_since = max(self._busy_since, self._answers[-1] if self._answers else 0.0)
            if now - quiet_since >= self.min_busy_s:
                return 0.0
        return None

    def wait_s(self, in_flight: int) -> float | None:
        """Seconds until one more request would finish (None: not known yet)."""
        rate = self.throughput()
        return None if rate is None else _finish_s(rate, in_flight)

    def refusal(self, in_flight: int, budget_s: float) -> APIError | None:
        """A 503 for a request with ``budget_s`` left that would not finish in it, else None."""
        rate = self.throughput()
        if rate is None:
            return None
        wait = _finish_s(rate, in_flight)
        if wait <= budget_s:
            return None
        drain = (in_flight + 1 - rate * budget_s) / rate if rate > 0 else MAX_RETRY_AFTER_S
        retry = max(1, min(MAX_RETRY_AFTER_S, math.ceil(drain)))
        if rate > 0:
            said = f"{in_flight} in flight at {rate:.2f} answers/s"
        else:
            said = f"no answer in {self.busy_seconds():.0f} busy seconds"
        return overloaded(f"this request would not finish within its {budget_s:g} s deadline "
                          f"({said}: about {wait:.0f} s); retry in {retry} s", retry)


class Tickets:
    """In-flight slots: taken per request, given back exactly once; they tell the admission
    when the replica is busy."""

    def __init__(self, admission: Admission | None = None) -> None:
        self.held: dict[int, float] = {}  # ticket -> when it must have been given back
        self.admission = admission or Admission()
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self.held)

    def take(self, expires: float) -> int:
        ticket = next(self._ids)
        self.held[ticket] = expires
        self.admission.in_flight_changed(len(self.held) - 1, len(self.held))
        metric("requests_in_flight").set(len(self.held))
        return ticket

    def give_back(self, ticket: int, answered: bool = False) -> None:
        if self.held.pop(ticket, None) is not None:
            if answered:
                self.admission.answered()
            self.admission.in_flight_changed(len(self.held) + 1, len(self.held))
            metric("requests_in_flight").set(len(self.held))

    def sweep(self) -> int:
        """Reclaim tickets held past their expiry (never expected; logged)."""
        now = time.time()
        stale = [t for t, expires in self.held.items() if now > expires]
        for ticket in stale:
            self.give_back(ticket)
        if stale:
            log.warning("reclaimed %d in-flight slot(s) held past their deadline", len(stale))
        return len(stale)
