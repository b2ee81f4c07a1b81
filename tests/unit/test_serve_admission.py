"""Admission: recent answers' tail latency, scaled by concurrency, refuses at once what cannot
finish in time; a stall is refused; a burst on a fresh replica is refused beyond a slow start;
an idle spell changes nothing."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from pipelines.serve.admission import (
    ADMIT_RESERVE_S,
    COLD_IN_FLIGHT,
    COLD_MIN_BUDGET_S,
    IDLE_SETTLE_S,
    RECHECK_S,
    Admission,
    Tickets,
)
from pipelines.serve.errors import APIError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _answers(admission: Admission, clock: Clock, took: list[float], level: float) -> None:
    for seconds in took:
        clock.now += 0.1
        admission.answered(seconds, level)


def test_the_tail_of_recent_answers_scaled_by_concurrency():
    clock = Clock()
    admission = Admission(window_s=60, clock=clock)
    assert admission.wait_s(5) is None  # nothing measured yet
    _answers(admission, clock, [1.0] * 8 + [3.0, 3.0], level=10)  # p90: 3 s at 10 in flight
    # mean 1.4 s at 10 in flight: each request beyond 10 adds 0.14 s to the 3 s tail
    # idle: queues behind no one, but for a moment it may be between two of a load's
    # requests: the tail; settled, the tail of one answer's cost at its concurrency (3/10)
    assert admission.wait_s(0) == pytest.approx(3.0)
    clock.now += IDLE_SETTLE_S
    assert admission.wait_s(0) == pytest.approx(0.3)
    assert admission.wait_s(9) == pytest.approx(3.0)  # the tail, at the level measured
    # fewer in flight than measured: each answer shorter in proportion (2 of 10: 3 s -> 0.6 s)
    assert admission.wait_s(1) == pytest.approx(0.6)
    assert admission.wait_s(4) == pytest.approx(1.5)
    assert admission.wait_s(19) == pytest.approx(3.0 + 10 * 0.14)
    # 70% of the budget less the reserve: 6.1 s -> 3.77 s, so 15 in flight (+5 x 0.14 s) fit
    usable = 0.7 * 6.1 - ADMIT_RESERVE_S
    assert admission.refusal(9, budget_s=6.1) is None
    assert admission.wait_s(14) <= usable < admission.wait_s(15)
    assert admission.refusal(14, budget_s=6.1) is None
    error = admission.refusal(15, budget_s=6.1)
    assert error is not None and error.status == 503 and error.code == "overloaded"
    assert "within its 6.1 s deadline" in error.message
    assert error.headers["Retry-After"] == str(math.ceil(admission.wait_s(15) - usable))
    assert admission.refusal(9, budget_s=4) is not None  # 3 s > 0.7 * 4 - 0.5
    assert admission.refusal(1, budget_s=4) is None  # 0.6 s fits
    assert admission.refusal(0, budget_s=4) is None  # idle: 0.3 s fits


def test_an_idle_replica_is_not_refused_for_a_past_load():
    """After a heavy load (15 s answers at 8 in flight) a lone request is promised what one
    answer cost then, not the load's queueing; at light load, the median answer."""
    clock = Clock()
    admission = Admission(window_s=30, clock=clock)
    admission.in_flight_changed(0, 8)
    _answers(admission, clock, [15.0] * 10, level=8)
    admission.in_flight_changed(1, 0)  # the load just ended: refused for IDLE_SETTLE_S
    error = admission.refusal(0, budget_s=20)
    assert error is not None and error.headers["Retry-After"] == str(math.ceil(IDLE_SETTLE_S))
    clock.now += IDLE_SETTLE_S
    assert admission.wait_s(0) == pytest.approx(15.0 / 8)
    assert admission.refusal(0, budget_s=20) is None
    # two in flight after the load of eight: a quarter of its 15 s, not its queueing
    assert admission.wait_s(1) == pytest.approx(15.0 * 2 / 8)
    assert admission.refusal(1, budget_s=20) is None and admission.refusal(7, budget_s=20)
    # a light client's next request, right after an answer that ran alone: settled at once
    _answers(admission, clock, [0.5], level=1)
    admission.in_flight_changed(1, 0)
    assert admission.idle_s() == 0 and admission.wait_s(0) < 15.0
    light = Admission(window_s=30, clock=clock)
    _answers(light, clock, [1.0] * 5 + [4.0] * 5, level=1)
    assert light.wait_s(0) == pytest.approx(4.0)  # p90 of took/level = 4, median 4
    _answers(light, clock, [1.0] * 10, level=1)
    assert light.wait_s(0) == pytest.approx(1.0)


def test_a_slower_machine_shows_as_soon_as_its_answers_do():
    clock = Clock()
    admission = Admission(window_s=30, clock=clock)
    _answers(admission, clock, [1.0] * 10, level=2)
    assert admission.refusal(3, budget_s=4) is None  # 2 s
    clock.now += 31  # a neighbour takes the CPUs: the same requests now take 4 s
    _answers(admission, clock, [4.0] * 4, level=2)
    assert admission.wait_s(1) == pytest.approx(4.0)
    assert admission.refusal(1, budget_s=4) is not None
    clock.now += 100  # idle: the last window that held enough answers still holds
    assert admission.wait_s(1) == pytest.approx(4.0)
    clock.now += 21  # until it is LAST_WINDOW_TTL_S old: then the replica starts cold
    assert admission.wait_s(1) is None and admission.refusal(0, budget_s=4) is None
    # cold: a tight deadline is promised only to a request alone in the app
    tight = admission.refusal(1, budget_s=4)
    assert tight is not None and "promise a 4 s deadline" in tight.message
    assert admission.refusal(1, budget_s=COLD_MIN_BUDGET_S) is None
    assert admission.refusal(COLD_IN_FLIGHT, budget_s=20) is not None


def test_a_stall_is_refused_and_a_slow_start_is_not():
    clock = Clock()
    admission = Admission(window_s=30, min_answers=4, min_busy_s=10, clock=clock)
    admission.in_flight_changed(0, 1)
    clock.now += 5
    assert admission.refusal(1, budget_s=20) is None  # 5 busy seconds, no answer: too early
    clock.now += 6
    error = admission.refusal(1, budget_s=20)  # 11 busy seconds without an answer: stuck
    assert error is not None and "no answer in 11 busy seconds" in error.message
    assert error.headers["Retry-After"] == "30"
    _answers(admission, clock, [0.5] * 8, level=1)
    assert admission.refusal(1, budget_s=20) is None  # answering again
    stalled = Admission(window_s=30, min_answers=4, min_busy_s=10, clock=clock)
    stalled.in_flight_changed(0, 1)
    clock.now += 12
    assert stalled.refusal(1, budget_s=20) is not None
    stalled.in_flight_changed(1, 0)  # its requests ended (timed out): the stall is over
    assert stalled.refusal(0, budget_s=20) is None


def test_beyond_the_concurrency_measured_the_estimate_is_pessimistic():
    clock = Clock()
    tickets = Tickets(Admission(window_s=30, min_answers=4, clock=clock))
    admission = tickets.admission
    # nothing answered yet: COLD_IN_FLIGHT at a time, then a 503 with Retry-After 1
    assert admission.refusal(COLD_IN_FLIGHT - 1, budget_s=1000) is None
    cold = admission.refusal(COLD_IN_FLIGHT, budget_s=1000)
    assert cold is not None and cold.headers["Retry-After"] == "1"
    for took in (1.0, 1.0, 1.0, 3.0):  # p90 3 s, mean 1.5 s, two in flight
        clock.now += 0.1
        admission.answered(took, level=2, peak=2)
    assert admission.trusted_in_flight() == 4
    # measured range: the tail plus the mean cost (1.5 / 2) of each request beyond the level
    assert admission.wait_s(3) == pytest.approx(3.0 + 2 * 0.75)
    # beyond it: the tail itself grows with the number in flight (5 / 2 x 3 s)
    assert admission.wait_s(4) == pytest.approx(7.5)
    clock.now += 100  # a quiet spell keeps the last measurements
    assert admission.trusted_in_flight() == 4 and admission.wait_s(4) == pytest.approx(7.5)


def test_tickets_tell_the_admission_what_answered_requests_took():
    clock = Clock()
    tickets = Tickets(Admission(window_s=60, clock=clock))
    held = [tickets.take(expires=clock.now + 100) for _ in range(4)]
    clock.now += 4
    for ticket in held:
        tickets.give_back(ticket, answered=True)
        tickets.give_back(ticket, answered=True)  # given back twice: counted once
    recent = tickets.admission.recent()
    assert [a.took_s for a in recent] == [4.0] * 4
    # in flight when each came in (1..4) and when it left (4..1), averaged
    assert [a.level for a in recent] == [2.5, 2.5, 2.5, 2.5]
    assert [a.peak for a in recent] == [4, 3, 3, 4]
    ticket = tickets.take(expires=clock.now + 100)
    tickets.give_back(ticket)  # refused later or timed out: not an answer
    assert len(tickets.admission.recent()) == 4 and len(tickets) == 0
    stale = tickets.take(expires=0.0)  # its expiry (time.time()) long past
    assert tickets.sweep() == 1 and stale not in tickets.held


def test_a_burst_behind_an_admitted_request_refuses_it_at_once():
    """Admitted alone with 2.3 s of its 4 s budget usable, a request that a burst of six
    followed is cancelled and refused as the burst comes in; one with nobody new behind it,
    or one that answered, is not; past ``RECHECK_S`` it is not checked again; a client that
    went away cancels the work."""
    clock = Clock()
    tickets = Tickets(Admission(window_s=60, clock=clock))
    _answers(tickets.admission, clock, [1.5] * 10, level=2)  # p90 1.5 s at 2 in flight

    async def scenario() -> None:
        cancelled = []

        async def work(seconds: float) -> str:
            try:
                await asyncio.sleep(seconds)
            except asyncio.CancelledError:
                cancelled.append(seconds)
                raise
            return "answer"

        async def burst(count: int, after_s: float) -> list[int]:
            await asyncio.sleep(after_s)
            return [tickets.take(expires=time.time() + 100) for _ in range(count)]

        first = tickets.take(expires=time.time() + 100)
        assert tickets.recheck(first, budget_s=4) is None  # nobody new behind it
        arrived = time.perf_counter()
        behind = asyncio.ensure_future(burst(6, 0.1))
        with pytest.raises(APIError) as refused:
            await tickets.first_or_refusal(asyncio.ensure_future(work(30)), first, arrived, 4)
        assert refused.value.status == 503 and "6 in flight" in refused.value.message
        assert time.perf_counter() - arrived < RECHECK_S  # as the burst came, not later
        later = await behind
        assert tickets.recheck(later[-1], budget_s=4) is None  # nobody came after it
        await asyncio.sleep(0)
        assert cancelled == [30]
        quick = asyncio.ensure_future(work(0.01))
        assert await tickets.first_or_refusal(quick, first, time.perf_counter(), 4) == "answer"
        # past RECHECK_S, a burst no longer refuses it
        long_ago = time.perf_counter() - RECHECK_S
        assert await tickets.first_or_refusal(asyncio.ensure_future(work(0.05)), first,
                                              long_ago, 4) == "answer"
        outer = asyncio.ensure_future(tickets.first_or_refusal(
            asyncio.ensure_future(work(20)), later[-1], time.perf_counter(), 20))
        await asyncio.sleep(0.05)
        outer.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await outer
        await asyncio.sleep(0)
        assert cancelled == [30, 20]

    asyncio.run(asyncio.wait_for(scenario(), timeout=20))
