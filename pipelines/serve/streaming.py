"""Streaming, batched answer decoding on top of transformers' streamer hook and a thread.

:func:`stream_decode` runs the same ``llm.generate`` call as :func:`mova.generation.decode`
(same padding, end-of-sequence ids, sampling settings and seeding) in a background thread and
yields, after every decoding step, the text each row added. Rows may carry their own
``max_new_tokens`` and stop strings; a row that is done stops early. The final text of a row
equals what ``decode`` returns, and its streamed deltas concatenate to that text.
(``TextIteratorStreamer`` handles one row only, so the streamer here is a batched one.)
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from mova.generation import _cut_stop, _eos_ids, _left_pad

if TYPE_CHECKING:
    from mova.model import MoVAModel

log = logging.getLogger(__name__)

_INCOMPLETE = "\ufffd"  # what a tokenizer decodes half of a multi-byte character to


@dataclass(frozen=True)
class DecodeParams:
    """One row's decoding settings (OpenAI's ``max_tokens``, ``temperature``, ...)."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def group_key(self) -> tuple:
        """Rows with equal keys can share one ``generate`` call. Greedy rows always can; a
        seeded sampling row decodes alone, so its result does not depend on its neighbours."""
        if not self.do_sample:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", id(self))
        return ("sample", self.temperature, self.top_p)


@dataclass
class StreamEvent:
    """New text of one row; ``done`` rows also carry the final text and token counts."""

    row: int
    delta: str = ""
    done: bool = False
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("delta", "done", "text", "finish_reason",
                                              "prompt_tokens", "completion_tokens")}


class TextAssembler:
    """Turns one row's growing token list into text deltas.

    Text is held back while it could still change: trailing whitespace and leading whitespace
    (the final text is stripped, as ``decode`` strips it), an incomplete multi-byte character,
    and a suffix that may be the start of a stop string. So the deltas always concatenate to a
    prefix of the final text.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.emitted = ""
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Add one token; returns the text that became stable."""
        self.tokens.append(int(token))
        text = self._decode()
        cut = _cut_stop(text, self.stop)
        if len(cut) < len(text):
            self.stopped = True
            return self._advance(cut.strip())
        if text.endswith(_INCOMPLETE):
            return ""
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                   default=0)
        return self._advance(text[:len(text) - hold].strip())

    def _advance(self, stable: str) -> str:
        if not stable.startswith(self.emitted):
            return ""
        delta, self.emitted = stable[len(self.emitted):], stable
        return delta

    def finish(self) -> tuple[str, str]:
        """(final text as ``decode`` gives it, the delta still to send)."""
        final = _cut_stop(self._decode(), self.stop).strip()
        if not final.startswith(self.emitted):
            log.warning("streamed text %r is not a prefix of the final text %r", self.emitted,
                        final)
            return final, ""
        return final, final[len(self.emitted):]


class _Rows:
    """Per-row state shared by the streamer (which feeds it) and the stopping criterion."""

    def __init__(self, tokenizer, params: Sequence[DecodeParams], prompt_lengths: list[int],
                 eos: set[int]) -> None:
        self.params = list(params)
        self.prompt_lengths = prompt_lengths
        self.eos = eos
        self.text = [TextAssembler(tokenizer, p.stop) for p in params]
        self.done = [False] * len(params)
        self.cancelled = threading.Event()

    def step(self, tokens: list[int]) -> list[StreamEvent]:
        events = []
        for i, token in enumerate(tokens):
            if self.done[i]:
                continue
            if token in self.eos:
                events.append(self.close(i, "stop"))
                continue
            delta = self.text[i].add(token)
            if self.text[i].stopped:
                events.append(self.close(i, "stop", delta))
            elif len(self.text[i].tokens) >= self.params[i].max_new_tokens:
                events.append(self.close(i, "length", delta))
            elif delta:
                events.append(StreamEvent(row=i, delta=delta))
        return events

    def close(self, i: int, reason: str, delta: str = "") -> StreamEvent:
        self.done[i] = True
        final, rest = self.text[i].finish()
        return StreamEvent(row=i, delta=delta + rest, done=True, text=final,
                           finish_reason=reason, prompt_tokens=self.prompt_lengths[i],
                           completion_tokens=len(self.text[i].tokens))

    def close_all(self) -> list[StreamEvent]:
        return [self.close(i, "length") for i in range(len(self.done)) if not self.done[i]]


class _Streamer(BaseStreamer):
    """Receives each step's tokens from ``generate`` and queues the rows' events."""

    def __init__(self, rows: _Rows, out: queue.Queue) -> None:
        self.rows = rows
        self.out = out
        self.prompt_seen = False

    def put(self, value: Tensor) -> None:
        if not self.prompt_seen:  # generate first hands over the prompt ids
            self.prompt_seen = True
            return
        events = self.rows.step(value.reshape(-1).tolist())
        if events:
            self.out.put(events)

    def end(self) -> None:
        events = self.rows.close_all()
        if events:
            self.out.put(events)


class _StopDoneRows(StoppingCriteria):
    """Ends rows that hit their own token limit or a stop string (one step late, as the
    streamer sees a step's tokens after the criteria run), and every row on cancel."""

    def __init__(self, rows: _Rows) -> None:
        self.rows = rows

    def __call__(self, input_ids: Tensor, scores: Tensor | None, **kwargs) -> Tensor:
        if self.rows.cancelled.is_set():
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return torch.tensor(self.rows.done, dtype=torch.bool, device=input_ids.device)


_END = object()


@dataclass
class _Failure:
    error: BaseException


def stream_decode(model: MoVAModel, prompt_ids: Sequence[Sequence[int]],
                  image_tokens: Tensor | None, params: Sequence[DecodeParams],
                  ) -> Iterator[list[StreamEvent]]:
    """Decode a batch in a background thread, yielding each step's events (a row's last event
    has ``done=True``). All rows must share ``group_key``. Closing the iterator early stops
    the decode. Raises ``ValueError`` when a prompt plus its new tokens exceed the context."""
    if len(prompt_ids) != len(params) or not params:
        raise ValueError(f"{len(prompt_ids)} prompts but {len(params)} decode params")
    if len({p.group_key() for p in params}) != 1:
        raise ValueError("stream_decode rows must share sampling settings (group_key)")
    first = params[0]
    tok = model.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = _left_pad(prompt_ids, pad_id)
    max_new = max(p.max_new_tokens for p in params)
    limit = model.config.llm.max_position_embeddings
    if ids.shape[1] + max_new > limit:
        raise ValueError(f"prompt of {ids.shape[1]} tokens + max_new_tokens={max_new} "
                         f"exceeds the LLM's context of {limit} tokens")
    eos = _eos_ids(model)
    rows = _Rows(tok, params, [int(n) for n in mask.sum(1)], set(eos))
    out: queue.Queue = queue.Queue()
    kwargs: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": first.do_sample,
                              "eos_token_id": eos, "pad_token_id": pad_id,
                              "streamer": _Streamer(rows, out),
                              "stopping_criteria": StoppingCriteriaList([_StopDoneRows(rows)])}
    if first.do_sample:
        kwargs.update(temperature=first.temperature, top_p=first.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)

    def run() -> None:
        try:
            with torch.no_grad():
                embeds = model.embed(ids, image_tokens)
                attention = mask.to(model.device)
                if first.do_sample:
                    with torch.random.fork_rng(devices=[]):
                        if first.seed is not None:
                            torch.manual_seed(first.seed)
                        model.llm.generate(inputs_embeds=embeds, attention_mask=attention,
                                           **kwargs)
                else:
                    model.llm.generate(inputs_embeds=embeds, attention_mask=attention, **kwargs)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            out.put(_Failure(exc))
        finally:
            out.put(_END)

    thread = threading.Thread(target=run, name="mova-decode", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _END:
                break
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        rows.cancelled.set()
        thread.join()
