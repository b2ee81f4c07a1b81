"""Admission: Little's law over busy time refuses at once what cannot finish in time, and
neither an idle spell nor a cold start makes it refuse what can."""

from __future__ import annotations

import pytest

from pipelines.serve.admission import Admission, Tickets


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _busy(admission: Admission, clock: Clock, seconds: float, answers: int) -> None:
    """One busy spell of ``seconds`` with ``answers`` evenly spread, then idle."""
    admission.in_flight_changed(0, 1)
    for _ in range(answers):
        clock.now += seconds / answers
        admission.answered()
    admission.in_flight_changed(1, 0)


def test_refuses_what_would_finish_past_its_deadline():
    clock = Clock()
    admission = Admission(window_s=60, clock=clock)
    assert admission.refusal(100, budget_s=1) is None  # nothing measured yet: admit
    _busy(admission, clock, 10.0, 20)  # 2 answers per busy second
    assert admission.throughput() == pytest.approx(2.0)
    assert admission.wait_s(9) == pytest.approx(5.0)
    assert admission.refusal(9, budget_s=20) is None
    error = admission.refusal(59, budget_s=20)  # 60 / 2 = 30 s > 20 s
    assert error is not None and error.status == 503 and error.code == "overloaded"
    assert error.headers["Retry-After"] == "10"  # 60 - 2 * 20 = 20 requests to drain at 2/s
    assert "within its 20 s deadline" in error.message


def test_an_idle_spell_does_not_look_slow():
    clock = Clock()
    admission = Admission(window_s=60, clock=clock)
    _busy(admission, clock, 10.0, 20)
    clock.now += 40  # idle: answers per wall second would be 0.4, per busy second still 2
    assert admission.throughput() == pytest.approx(2.0)
    assert admission.refusal(29, budget_s=20) is None
    clock.now += 30  # the answers left the window: unknown again, admit
    assert admission.throughput() is None and admission.refusal(500, budget_s=1) is None


def test_a_stall_is_refused_and_a_slow_start_is_not():
    clock = Clock()
    admission = Admission(window_s=30, min_answers=4, min_busy_s=10, clock=clock)
    admission.in_flight_changed(0, 3)
    clock.now += 5
    assert admission.refusal(3, budget_s=20) is None  # 5 busy seconds, no answer: too early
    clock.now += 6
    error = admission.refusal(3, budget_s=20)  # 11 busy seconds without an answer: stuck
    assert error is not None and "no answer in 11 busy seconds" in error.message
    assert error.headers["Retry-After"] == "30"
    for _ in range(8):
        clock.now += 0.5
        admission.answered()
    assert admission.refusal(3, budget_s=20) is None  # answering again: 8 in 15 busy s
    stalled = Admission(window_s=30, min_answers=4, min_busy_s=10, clock=clock)
    stalled.in_flight_changed(0, 2)
    clock.now += 12
    assert stalled.refusal(2, budget_s=20) is not None
    stalled.in_flight_changed(2, 0)  # its requests ended (timed out): the stall is over
    assert stalled.refusal(0, budget_s=20) is None


def test_tickets_tell_the_admission_when_the_replica_is_busy():
    clock = Clock()
    tickets = Tickets(Admission(window_s=60, clock=clock))
    held = [tickets.take(expires=clock.now + 100) for _ in range(3)]
    clock.now += 4
    for ticket in held:
        tickets.give_back(ticket, answered=True)
        tickets.give_back(ticket, answered=True)  # given back twice: counted once
    clock.now += 50  # idle
    assert len(tickets) == 0
    assert tickets.admission.busy_seconds() == pytest.approx(4.0)
    tickets.admission.min_answers = 3
    assert tickets.admission.throughput() == pytest.approx(0.75)
