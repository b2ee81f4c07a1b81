"""The ingress replicas' shared load: the board sums the peers' fresh counts; the ingress
reports its own as it changes and counts the peers' in its admission, and without a board
it counts only its own."""

from __future__ import annotations

import asyncio

import pytest

from pipelines.serve import load_board
from pipelines.serve.admission import Admission, Tickets
from pipelines.serve.load_board import STALE_S, Counts


def test_the_board_sums_the_other_replicas_fresh_counts():
    counts = Counts()
    assert counts.report("a", 3, now=0.0) == 0
    assert counts.report("b", 5, now=0.5) == 3
    assert counts.report("a", 4, now=0.6) == 5
    # b stopped reporting (killed): after STALE_S it no longer counts
    assert counts.report("a", 4, now=0.5 + STALE_S + 0.1) == 0


def test_peers_in_flight_count_in_the_admission_and_refuse_a_request_behind_them():
    tickets = Tickets(Admission(window_s=60))
    for _ in range(10):
        tickets.admission.answered(1.5, 2.0)  # p90 1.5 s at 2 in flight
    first = tickets.take(expires=1e12)
    assert tickets.load() == 1 and tickets.recheck(first, budget_s=4) is None
    tickets.set_others(6)  # the other ingress admitted a burst
    assert tickets.load() == 7 and len(tickets) == 1
    refusal = tickets.recheck(first, budget_s=4)
    assert refusal is not None and "6 in flight" in refusal.message
    assert tickets.admission.idle_s() == 0
    tickets.give_back(first)
    assert tickets.admission.idle_s() == 0  # the peers are still busy
    tickets.set_others(0)
    assert tickets.load() == 0


class FakeBoard:
    """Answers with ``answers`` in turn (an exception is raised; "slow" never answers)."""

    def __init__(self, answers: list) -> None:
        self.answers, self.reports = answers, []
        self.report = self

    def remote(self, replica: str, in_flight: int):
        self.reports.append((replica, in_flight))
        answer = self.answers.pop(0) if self.answers else 0

        async def reply() -> int:
            if answer == "slow":
                await asyncio.sleep(60)
            if isinstance(answer, Exception):
                raise answer
            return answer

        return reply()


def test_the_ingress_reports_as_its_count_changes_and_survives_a_lost_board(monkeypatch):
    boards = [FakeBoard([2, RuntimeError("the board's owner died")]),
              FakeBoard([3, "slow", "slow"])]
    made = []

    def board(app: str):
        made.append(app)
        return boards[len(made) - 1]

    monkeypatch.setattr(load_board, "_board", board)
    monkeypatch.setattr(load_board, "REPORT_S", 5.0)  # only changes trigger a report here
    monkeypatch.setattr(load_board, "BOARD_TIMEOUT_S", 0.1)
    monkeypatch.setattr(load_board, "STALE_S", 0.3)

    async def scenario() -> None:
        tickets = Tickets(Admission())
        task = asyncio.create_task(load_board.share_load(tickets, "mova", "r1"))
        await asyncio.sleep(0.05)
        assert tickets.others == 2  # the first report's answer
        ticket = tickets.take(expires=1e12)  # a change: reported at once; the board died
        await asyncio.sleep(0.05)
        assert boards[0].reports == [("r1", 0), ("r1", 1)] and tickets.others == 2
        tickets.give_back(ticket)  # the next report makes the board again
        await asyncio.sleep(0.05)
        assert made == ["mova", "mova"] and boards[1].reports == [("r1", 0)]
        assert tickets.others == 3
        ticket = tickets.take(expires=1e12)  # the board is slow: its last answer holds
        await asyncio.sleep(0.15)
        assert tickets.others == 3
        await asyncio.sleep(0.3)
        tickets.give_back(ticket)  # still slow, and the last answer is stale: only its own
        await asyncio.sleep(0.2)
        assert tickets.others == 0 and made == ["mova", "mova"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(scenario(), timeout=10))
