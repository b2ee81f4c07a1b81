"""The serving engines without Ray: the LLM's continuous-batching decode loop and the vision
deployments' deadline-aware batcher, including how each gets out of a stuck state."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from mova.decoding import DecodeParams
from mova.factory import build_tiny_mova
from pipelines.serve.batching import Batcher, BatchSettings
from pipelines.serve.engine import DecodeEngine
from pipelines.serve.errors import DeadlineExceeded, ReplicaUnhealthy
from pipelines.serve.progress import HARD_FACTOR, StallJudge

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    model = build_tiny_mova(seed=0, experts=["sam"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random tiny LLMs repeat one token: perturb for varied text
        for p in model.llm.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _prompt(model, i: int) -> list[int]:
    return model.tokenizer.encode(f"question number {i} " * (1 + i % 3))


def _build(model, ids):
    def build():
        return model.prompt_embeddings([ids], None)
    return build


async def _collect(engine, build, params, deadline) -> list[dict]:
    return [e async for e in engine.stream(build, params, deadline)]


def test_rows_joining_and_leaving_a_running_batch_decode_as_alone(model):
    """Rows arrive while others decode (continuous batching; the cache is trimmed as rows
    leave): every row's text equals decoding it alone."""
    params = [DecodeParams(max_new_tokens=n) for n in (12, 3, 9, 5, 14, 2)]
    prompts = [_prompt(model, i) for i in range(len(params))]
    alone = [model.decode([ids], None, p)[0][0] for ids, p in zip(prompts, params, strict=True)]

    async def run():
        engine = DecodeEngine(model.new_decoder, max_rows=4)
        far = time.time() + 60

        async def one(i):
            await asyncio.sleep(0.01 * i)  # staggered: most join a running batch
            events = await _collect(engine, _build(model, prompts[i]), params[i], far)
            assert "".join(e["delta"] for e in events) == events[-1]["text"]
            return events[-1]["text"]

        texts = await asyncio.gather(*(one(i) for i in range(len(params))))
        return texts, engine.summary()

    texts, summary = asyncio.run(run())
    assert texts == alone
    assert summary["mean_rows"] > 1  # rows really shared decode steps


def test_cancel_and_deadline_end_a_row_within_a_step(model):
    async def run():
        engine = DecodeEngine(model.new_decoder)
        long = DecodeParams(max_new_tokens=400)
        # a deadline passing mid-decode: a timeout event, soon
        start = time.time()
        events = await _collect(engine, _build(model, _prompt(model, 1)), long, start + 0.3)
        assert events[-1].get("timeout") and time.time() - start < 5
        # a caller that stops listening: its row leaves the batch at the next step
        stream = engine.stream(_build(model, _prompt(model, 2)), long, time.time() + 60)
        await anext(stream)
        await stream.aclose()
        for _ in range(100):
            if engine.summary()["queued"] == 0 and not engine._waiting:
                break
            await asyncio.sleep(0.05)
        steps = engine.steps
        await asyncio.sleep(0.3)
        assert engine.steps - steps <= 1  # nothing left to decode
        # the engine still serves
        ok = await _collect(engine, _build(model, _prompt(model, 3)), DecodeParams(
            max_new_tokens=3), time.time() + 60)
        assert ok[-1]["done"]

    asyncio.run(run())


def test_a_stuck_step_makes_the_engine_unhealthy_and_fails_waiters(model):
    async def run():
        engine = DecodeEngine(model.new_decoder, stall_grace_s=0.3)
        engine.stall_next_s = 3.0  # the next step blocks its thread like a stuck ray.get
        params = DecodeParams(max_new_tokens=4)
        task = asyncio.ensure_future(_collect(engine, _build(model, _prompt(model, 0)), params,
                                              time.time() + 0.2))
        with pytest.raises(ReplicaUnhealthy):
            for _ in range(50):
                engine.check()
                await asyncio.sleep(0.1)
        events = await asyncio.wait_for(task, 2)
        assert events[-1].get("unavailable")
        with pytest.raises(ReplicaUnhealthy):  # new work is refused until replaced
            await anext(engine.stream(_build(model, [1, 2]), params, time.time() + 60))

    asyncio.run(run())


def test_batcher_batches_what_queued_and_drops_expired_items():
    sizes = []
    release = threading.Event()

    def work(items):
        sizes.append(len(items))
        release.wait(5)
        return [i * 2 for i in items]

    async def run():
        batcher = Batcher("test", work, BatchSettings(max_batch_size=8))
        far = time.time() + 30
        first = asyncio.ensure_future(batcher.submit(1, far))
        await asyncio.sleep(0.05)  # the first batch is running: the next ones queue
        rest = [asyncio.ensure_future(batcher.submit(i, far)) for i in range(2, 6)]
        expired = asyncio.ensure_future(batcher.submit(9, time.time() + 0.05))
        await asyncio.sleep(0.1)
        release.set()
        assert await first == 2 and await asyncio.gather(*rest) == [4, 6, 8, 10]
        with pytest.raises(DeadlineExceeded):
            await expired
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(1, time.time() - 1)
        return batcher.summary()

    summary = asyncio.run(run())
    assert sizes == [1, 4] and summary["requests"] == 5


def test_a_stuck_batch_turns_the_batcher_unhealthy():
    def work(items):
        time.sleep(2.0)
        return items

    async def run():
        batcher = Batcher("test", work, BatchSettings(stall_grace_s=0.2))
        stuck = asyncio.ensure_future(batcher.submit(1, time.time() + 0.1))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit(2, time.time() + 30))
        start = time.time()
        for outcome in await asyncio.gather(stuck, queued, return_exceptions=True):
            assert isinstance(outcome, ReplicaUnhealthy)
        assert time.time() - start < 1.5  # the waiters did not wait for the stuck thread
        with pytest.raises(ReplicaUnhealthy):
            batcher.check()
        with pytest.raises(ReplicaUnhealthy):
            await batcher.submit(3, time.time() + 30)

    asyncio.run(run())


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(1000))


def test_the_judge_tells_a_blocked_thread_from_a_computing_one():
    def judged(body) -> str | None:
        judge = StallJudge(grace_s=0.3)
        ready, verdict = threading.Event(), []

        def worker():
            judge.bind()
            judge.started()
            ready.set()
            body()

        thread = threading.Thread(target=worker)
        thread.start()
        ready.wait(5)
        time.sleep(0.4)
        verdict.append(judge.stuck(overdue_s=0.1))
        thread.join(5)
        return verdict[0]

    assert "no progress" in judged(lambda: time.sleep(0.6))  # blocked, like a stuck ray.get
    assert judged(lambda: _spin(0.6)) is None  # slow but computing
    judge = StallJudge(grace_s=0.3)
    judge.bind()
    judge.started()
    assert "x stall_grace_s" in judge.stuck(overdue_s=0.3 * HARD_FACTOR)  # too long, however


def test_a_slow_batch_fails_its_callers_but_keeps_the_replica():
    def work(items):
        if items == [1]:
            _spin(1.0)  # computing, only slowly (a loaded machine)
        return items

    async def run():
        batcher = Batcher("test", work, BatchSettings(stall_grace_s=0.2))
        slow = asyncio.ensure_future(batcher.submit(1, time.time() + 0.1))
        with pytest.raises(DeadlineExceeded, match="slow, not stuck"):
            await slow
        batcher.check()  # healthy: Serve keeps the replica
        assert await batcher.submit(2, time.time() + 30) == 2
        assert batcher.summary()["unhealthy"] is None

    asyncio.run(run())
