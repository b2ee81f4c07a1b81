"""Admission at the ingress: in-flight slots, and refusing at once what cannot finish in time.

A request that waits its whole deadline and then gets a 408 has cost the client that time and
the app its work. :class:`Admission` estimates, from what this replica has measured, how long
a new request would take, and the ingress refuses it at once (503 with ``Retry-After``) when
that is past its deadline.

The estimate is the recent answers' own times: their 90th percentile (requests differ in size;
the tail is what a deadline must cover; an answer measured while more requests shared the
replica than would share it now counts shorter, in proportion), plus, for each request in
flight beyond the average number that shared the replica while those answers ran, one more
answer's worth of time at the throughput they imply (Little's law: ``X = L / W``, so each
extra request ahead costs ``W / L``). So a machine that slowed down (a neighbour took the
CPUs) shows in the estimate as soon as its answers do, and a replica is promised only what it
has recently done. A replica busy for
``MIN_BUSY_S`` without any answer is stalled: everything is refused until it answers again.

A replica idle for less than ``IDLE_SETTLE_S`` promises a lone request the recent answers'
tail (it may be between two of a load's requests, while the replicas it shares the models with
are busy); once idle that long, or right after an answer that ran alone (a light client's next
request), the smaller of the median and the tail of what one answer cost at the concurrency it
ran at (``took / level``): the queueing of a past load must not keep refusing it. It forgets a
window ``LAST_WINDOW_TTL_S`` old.

An estimate cannot see the requests that come after the one it admits. So for ``RECHECK_S``
after it arrived, while its answer has not begun, a request is admitted again whenever another
one is (:meth:`Tickets.first_or_refusal`): one that a burst behind it would have had refused
is cancelled and refused then, within the 2 s a refusal is promised in (the HTTP proxy's hop
may take a second of them on a loaded machine), instead of ending in a 408 at its deadline.

The estimate may use only ``ADMIT_SHARE`` of a request's budget, less ``ADMIT_RESERVE_S``
(the reply's trip and scheduling noise). Nor is the law trusted beyond the concurrency it was
measured at: past twice the most requests answered at once lately, no gain from batching is
assumed (the tail grows in proportion to the number in flight), so a burst onto a replica that
has only seen light load is admitted only as far as that pessimistic estimate allows. Before
a replica has answered ``MIN_ANSWERS`` requests it admits ``COLD_IN_FLIGHT`` at a time, and
beside another one only a request with at least ``cold_min_budget_s`` (the ingress: half the
app's ``request_timeout_s``): a tight deadline is not promised on no measurement. After an idle
spell that emptied the window the last measurements hold, up to ``LAST_WINDOW_TTL_S``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pipelines.serve.errors import APIError, overloaded
from pipelines.serve.metrics import metric

log = logging.getLogger(__name__)
T = TypeVar("T")

WINDOW_S = 30.0  # how far back answers count
MIN_ANSWERS = 4  # answers in the window before the estimate is trusted
MIN_BUSY_S = 10.0  # busy this long without an answer (and too few to estimate): stalled
MAX_RETRY_AFTER_S = 30
TAIL_QUANTILE = 0.9  # of recent answers' times: what an admitted request is promised
ADMIT_SHARE = 0.7  # of a request's budget, what the estimate may take
ADMIT_RESERVE_S = 0.5  # and less this: the reply's trip and scheduling noise
COLD_IN_FLIGHT = 2  # in flight at most, before the replica has answered anything
COLD_MIN_BUDGET_S = 10.0  # and, beside another request, only with this much budget
LAST_WINDOW_TTL_S = 120.0  # how long an idle replica keeps the last window it measured
IDLE_SETTLE_S = 2.0  # idle this long, a replica is past a load (not between two requests)
RECHECK_S = 0.6  # this long after arrival, a burst behind a request may still refuse it


@dataclass(frozen=True)
class Answer:
    """One answered request: when it ended, how long it took, how many were in flight
    (itself included) on average while it ran and at the most it saw."""

    at: float
    took_s: float
    level: float
    peak: int


class Admission:
    """Recent answers' times and concurrency, and the wait they imply for one more request."""

    def __init__(self, window_s: float = WINDOW_S, min_answers: int = MIN_ANSWERS,
                 min_busy_s: float = MIN_BUSY_S, admit_share: float = ADMIT_SHARE,
                 clock: Callable[[], float] = time.monotonic,
                 cold_min_budget_s: float = COLD_MIN_BUDGET_S) -> None:
        self.window_s, self.min_answers, self.min_busy_s = window_s, min_answers, min_busy_s
        self.admit_share, self.cold_min_budget_s = admit_share, cold_min_budget_s
        self.clock = clock
        self._answers: deque[Answer] = deque(maxlen=512)
        self._busy_since: float | None = None
        self._idle_since: float | None = clock()
        self._last: list[Answer] = []  # the latest window with enough answers

    def in_flight_changed(self, before: int, after: int,
                          load: tuple[int, int] | None = None) -> None:
        """Call when the number of requests in flight on this replica goes from ``before``
        to ``after`` (a replica busy without answering is stalled); ``load``: the app's
        requests in flight before and after (:meth:`load_changed`), when the replica has
        peers."""
        if before == 0 and after > 0:
            self._busy_since = self.clock()
        elif after == 0:
            self._busy_since = None
        self.load_changed(*(load or (before, after)))

    def load_changed(self, before: int, after: int) -> None:
        """Call when the app's requests in flight (on this replica and its peers, as far as
        this one knows) go from ``before`` to ``after``: when nothing is, the app is idle."""
        if after == 0:
            if before > 0 or self._idle_since is None:
                self._idle_since = self.clock()
        else:
            self._idle_since = None

    def idle_s(self) -> float:
        """How long nothing has been in flight (0 while something is)."""
        return 0.0 if self._idle_since is None else self.clock() - self._idle_since

    def answered(self, took_s: float, level: float, peak: int = 0) -> None:
        """A request finished with its answer after ``took_s``; ``level``: requests in flight
        while it ran (itself included), ``peak`` the most of them."""
        level = max(1.0, level)
        self._answers.append(Answer(self.clock(), took_s, level, max(peak, math.ceil(level))))

    def recent(self) -> list[Answer]:
        """The answers in the window, or the last window that held enough of them while it
        is younger than ``LAST_WINDOW_TTL_S`` (older, the replica starts cold again: what a
        past load measured cannot keep an idle replica refusing)."""
        now = self.clock()
        recent = [a for a in self._answers if a.at >= now - self.window_s]
        if len(recent) >= self.min_answers:
            self._last = recent
            return recent
        if self._last and now - self._last[-1].at > LAST_WINDOW_TTL_S:
            self._last = []
        return self._last

    def stalled_s(self) -> float:
        """How long the replica has been busy without an answer (0 when it is not)."""
        if self._busy_since is None:
            return 0.0
        last = self._answers[-1].at if self._answers else 0.0
        return self.clock() - max(self._busy_since, last)

    def _settled(self) -> bool:
        """Idle, and not for a moment between two of a load's requests: idle for
        ``IDLE_SETTLE_S``, or the last answer ran alone (a light client's next request)."""
        return self.idle_s() >= IDLE_SETTLE_S or bool(self._answers) and (
            self._answers[-1].peak <= 1)

    def wait_s(self, in_flight: int) -> float | None:
        """Seconds one more request would take (None: not known yet; inf: stalled)."""
        if self.stalled_s() >= self.min_busy_s:
            return math.inf
        recent = self.recent()
        if not recent:
            return None
        took = [a.took_s for a in recent]
        if in_flight == 0:
            # a lone request waits for no one here, but a replica idle for a moment amid a
            # load (the others sharing the models are busy, a burst may follow) is not idle:
            # the tail, as for a loaded one; once it has been idle IDLE_SETTLE_S, the smaller
            # of the median and the tail of what one answer cost at the concurrency it ran at
            # (a past load's times are its queue's)
            if not self._settled():
                return _quantile(took, TAIL_QUANTILE)
            return min(_quantile(took, 0.5),
                       _quantile([a.took_s / a.level for a in recent], TAIL_QUANTILE))
        # each answer's time at this concurrency: as measured where as many or more shared the
        # replica, shorter in proportion where fewer do than did then (a lighter load after a
        # heavy one must not be promised the heavy load's queueing)
        tail = _quantile([a.took_s * min(1.0, (in_flight + 1) / a.level) for a in recent],
                         TAIL_QUANTILE)
        level = sum(a.level for a in recent) / len(recent)
        per_request = sum(took) / len(took) / level  # 1 / throughput (Little's law)
        wait = tail + max(0.0, in_flight + 1 - level) * per_request
        if in_flight + 1 > self.trusted_in_flight(recent):
            # beyond what was measured: no gain from batching assumed, the tail grows with
            # the number in flight
            wait = max(wait, tail * (in_flight + 1) / level)
        return wait

    def trusted_in_flight(self, recent: list[Answer] | None = None) -> int:
        """Up to how many in flight the estimate holds: twice the most answered at once
        lately (at least ``COLD_IN_FLIGHT``); ``recent``: :meth:`recent`, if at hand."""
        recent = self.recent() if recent is None else recent
        return max(COLD_IN_FLIGHT, 2 * max((a.peak for a in recent), default=0))

    def refusal(self, in_flight: int, budget_s: float) -> APIError | None:
        """A 503 for a request with ``budget_s`` left that would not finish within its
        admissible share of it, else None."""
        wait = self.wait_s(in_flight)
        if wait is None:
            if in_flight == 0:
                return None  # alone in an idle app: the best case there is
            if budget_s < self.cold_min_budget_s:
                return overloaded(f"{in_flight} requests are in flight and this replica has "
                                  f"not answered enough yet to promise a {budget_s:g} s "
                                  f"deadline beside them; retry in 1 s", 1)
            if in_flight < COLD_IN_FLIGHT:
                return None
            return overloaded(f"{in_flight} requests are in flight and this replica has not "
                              f"answered enough yet to estimate more (it admits "
                              f"{COLD_IN_FLIGHT} at a time until it has); retry in 1 s", 1)
        usable = max(0.0, budget_s * self.admit_share - ADMIT_RESERVE_S)
        if wait <= usable:
            return None
        if math.isinf(wait):
            retry = MAX_RETRY_AFTER_S
            said = f"no answer in {self.stalled_s():.0f} busy seconds"
        else:
            retry = max(1, min(MAX_RETRY_AFTER_S, math.ceil(wait - usable)))
            if in_flight == 0 and not self._settled():
                retry = min(retry, math.ceil(IDLE_SETTLE_S))  # then it estimates a lone one
            said = f"{in_flight} in flight"
        return overloaded(f"this request would not finish within its {budget_s:g} s deadline "
                          f"({said}: about {wait:.0f} s); retry in {retry} s", retry)


def _pulse(event: asyncio.Event) -> asyncio.Event:
    """Wake whoever waits on ``event``; the event the next change will set."""
    event.set()
    return asyncio.Event()


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Tickets:
    """In-flight slots: taken per request, given back exactly once; they tell the admission
    how long answered requests took and how many shared the app meanwhile.

    ``others``: the requests in flight on the app's other ingress replicas, as they last
    reported them (:mod:`pipelines.serve.load_board`; 0 without peers): they share the model
    replicas, so the admission counts them with this replica's own (its ``load``)."""

    def __init__(self, admission: Admission | None = None) -> None:
        # ticket -> (when it must be given back, when taken, the load when taken, itself in)
        self.held: dict[int, tuple[float, float, int]] = {}
        self.others = 0
        self.admission = admission or Admission()
        self._ids = itertools.count()
        self._admitted = asyncio.Event()  # set (and replaced) whenever the load grows
        self._changed = asyncio.Event()  # ... whenever this replica's count changes

    def __len__(self) -> int:
        return len(self.held)

    def load(self) -> int:
        """Requests in flight in the app: this replica's and its peers'."""
        return len(self.held) + self.others

    def changed(self) -> asyncio.Event:
        """An event set when this replica's count next changes."""
        return self._changed

    def _count_changed(self) -> None:
        metric("requests_in_flight").set(len(self.held))
        self._changed = _pulse(self._changed)

    def set_others(self, count: int) -> None:
        """The peers' requests in flight, as they last reported them."""
        before, grew = self.load(), count > self.others
        self.others = max(0, count)
        self.admission.load_changed(before, self.load())
        if grew:
            self._admitted = _pulse(self._admitted)

    def take(self, expires: float) -> int:
        ticket, load = next(self._ids), self.load()
        self.held[ticket] = (expires, self.admission.clock(), load + 1)
        self.admission.in_flight_changed(len(self.held) - 1, len(self.held), (load, load + 1))
        self._count_changed()
        self._admitted = _pulse(self._admitted)
        return ticket

    def give_back(self, ticket: int, answered: bool = False) -> None:
        """Free ``ticket``; ``answered``: it finished with its answer."""
        held = self.held.pop(ticket, None)
        if held is None:
            return
        load = self.load()
        if answered:
            _, taken, level = held
            # the load it met coming in and leaves behind (itself included)
            self.admission.answered(self.admission.clock() - taken, (level + load + 1) / 2,
                                    max(level, load + 1))
        self.admission.in_flight_changed(len(self.held) + 1, len(self.held), (load + 1, load))
        self._count_changed()

    def recheck(self, ticket: int, budget_s: float) -> APIError | None:
        """The 503 for ``ticket``'s request (``budget_s`` its whole budget) if more requests
        came in after it than the admission would now take it behind, else None."""
        held = self.held.get(ticket)
        others = self.load() - 1
        if held is None or others <= held[2] - 1:
            return None
        return self.admission.refusal(others, budget_s)

    async def first_or_refusal(self, work: asyncio.Future[T], ticket: int, arrived: float,
                               budget_s: float) -> T:
        """``work``'s result. Until ``RECHECK_S`` after its request arrived (``arrived``: a
        ``time.perf_counter()``), each request admitted after it re-admits it
        (:meth:`recheck`): a burst behind it that would have had it refused cancels it, and
        the 503 is raised (still within a refusal's promised 2 s). ``work`` is cancelled
        whenever this ends early."""
        try:
            while not work.done():
                left = RECHECK_S - (time.perf_counter() - arrived)
                if left <= 0:
                    break
                admitted = asyncio.ensure_future(self._admitted.wait())
                try:
                    await asyncio.wait({work, admitted}, timeout=left,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    admitted.cancel()
                refusal = None if work.done() else self.recheck(ticket, budget_s)
                if refusal is not None:
                    log.debug("re-admission refused a request: %s", refusal.message)
                    raise refusal
            return await work
        except BaseException:
            work.cancel()
            raise

    def sweep(self) -> int:
        """Reclaim tickets held past their expiry (never expected; logged)."""
        now = time.time()
        stale = [t for t, (expires, *_) in self.held.items() if now > expires]
        for ticket in stale:
            self.give_back(ticket)
        if stale:
            log.warning("reclaimed %d in-flight slot(s) held past their deadline", len(stale))
        return len(stale)
