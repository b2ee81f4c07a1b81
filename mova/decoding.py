"""The one batched decode loop: a KV-cached batch that advances one token per step.

:class:`BatchDecoder` is used by everything that generates text: ``MoVAModel.generate`` and
evaluation collect its steps, the Serve LLM deployment streams them. Each row carries its own
settings (:class:`DecodeParams`: token limit, greedy or sampling with its own seed, stop
strings, an optional token constraint), so any mix of requests shares one forward pass per
step. Rows can join a running batch (:meth:`BatchDecoder.add`: continuous batching) and leave
it as soon as they finish or are cancelled, so a finished or abandoned row costs no more
compute. Text is assembled per row (:mod:`mova.text_stream`) so streamed deltas always
concatenate to the final text.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mova.text_stream import TextAssembler


class TokenConstraint(Protocol):
    """Restricts which tokens a row may produce next (e.g. the routing reply's grammar)."""

    def allowed_tokens(self, generated: Sequence[int]) -> Sequence[int] | None:
        """Token ids allowed after ``generated``; None allows every token."""


@dataclass(frozen=True)
class DecodeParams:
    """One row's decoding settings (OpenAI's ``max_tokens``, ``temperature``, ...)."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    constraint: TokenConstraint | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}; expected >= 1")
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1; got "
                             f"temperature={self.temperature}, top_p={self.top_p}")


@dataclass
class StepEvent:
    """New text of one row; a row's last event has ``done`` and carries its final text."""

    row: Hashable
    delta: str = ""
    done: bool = False
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("delta", "done", "text", "finish_reason",
                                              "prompt_tokens", "completion_tokens")}


class _Row:
    """Decoding state of one row: settings, text, random generator, counts."""

    def __init__(self, key: Hashable, params: DecodeParams, tokenizer: Any,
                 prompt_tokens: int) -> None:
        self.key = key
        self.params = params
        self.text = TextAssembler(tokenizer, params.stop)
        self.prompt_tokens = prompt_tokens
        self.generator: torch.Generator | None = None
        if params.do_sample and params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)

    def event(self, delta: str = "", reason: str | None = None) -> StepEvent:
        if reason is None:
            return StepEvent(row=self.key, delta=delta)
        final, rest = self.text.finish()
        return StepEvent(row=self.key, delta=delta + rest, done=True, text=final,
                         finish_reason=reason, prompt_tokens=self.prompt_tokens,
                         completion_tokens=len(self.text.tokens))


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token rows -> (ids, attention mask), padded on the left to the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


def _cache_argument(llm: nn.Module) -> str:
    """The keyword a causal LM takes its KV cache by (``cache`` in transformers >= 5.24)."""
    params = inspect.signature(llm.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _left_pad_cache(cache: Any, extra: int) -> None:
    """Prepend ``extra`` empty (masked) positions to every layer of a dynamic KV cache."""
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name)
            pad = t.new_zeros((*t.shape[:2], extra, t.shape[3]))
            setattr(layer, name, torch.cat([pad, t], dim=2))


def _join_caches(a: Any, b: Any) -> None:
    """Append the rows of cache ``b`` to cache ``a`` (same sequence length), in place."""
    for la, lb in zip(a.layers, b.layers, strict=True):
        la.keys = torch.cat([la.keys, lb.keys], dim=0)
        la.values = torch.cat([la.values, lb.values], dim=0)


def _joinable(cache: Any) -> bool:
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


class BatchDecoder:
    """A batch of rows decoded together, one token per row per :meth:`step`.

    ``add`` queues rows (their prompt embeddings); the next ``step`` prefills them and, when
    rows are already running, joins them to the running batch. Rows end on an end-of-sequence
    id, their own token limit, a stop string or :meth:`cancel`, and leave the batch then.
    """

    def __init__(self, llm: nn.Module, tokenizer: Any, eos_ids: Iterable[int], *,
                 max_context: int) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.eos = set(eos_ids)
        self.max_context = max_context
        self._cache_kw = _cache_argument(llm)
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: Tensor | None = None  # (B, T) over cached positions
        self._positions: Tensor | None = None  # (B,) position id of the next token
        self._last: Tensor | None = None  # (B,) token fed at the next step
        self._pending: list[tuple[list[_Row], Tensor, Tensor]] = []
        self._cancelled: set[Hashable] = set()
        self._cancel_lock = threading.Lock()  # cancel() may come from another thread

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    def __len__(self) -> int:
        """Rows running or waiting to start."""
        return len(self._rows) + sum(len(rows) for rows, _, _ in self._pending)

    @property
    def waiting(self) -> int:
        """Rows queued by :meth:`add` that have not started (they start at the next step,
        joining the running rows when the KV cache allows it)."""
        return sum(len(rows) for rows, _, _ in self._pending)

    def keys(self) -> list[Hashable]:
        return [r.key for r in self._rows] + [r.key for rows, _, _ in self._pending for r in rows]

    def add(self, embeds: Tensor, attention_mask: Tensor, params: Sequence[DecodeParams],
            keys: Sequence[Hashable]) -> None:
        """Queue rows given their left-padded prompt embeddings ``(n, T, D)`` and mask."""
        if not (len(params) == len(keys) == embeds.shape[0] == attention_mask.shape[0]):
            raise ValueError(f"{embeds.shape[0]} prompts, {len(params)} params, {len(keys)} keys")
        clash = set(keys) & set(self.keys())
        if clash or len(set(keys)) != len(keys):
            raise ValueError(f"row keys must be unique; repeated: {sorted(map(str, clash))}")
        lengths = attention_mask.sum(1).tolist()
        for n, p in zip(lengths, params, strict=True):
            if n + p.max_new_tokens > self.max_context:
                raise ValueError(f"prompt of {n} tokens + max_new_tokens={p.max_new_tokens} "
                                 f"exceeds the LLM's context of {self.max_context} tokens")
        rows = [_Row(k, p, self.tokenizer, int(n))
                for k, p, n in zip(keys, params, lengths, strict=True)]
        self._pending.append((rows, embeds, attention_mask))

    def cancel(self, key: Hashable) -> None:
        """End a row at the next step (no more compute for it, no final event). Safe to call
        from another thread than the one stepping."""
        with self._cancel_lock:
            self._cancelled.add(key)

    @torch.no_grad()
    def step(self) -> list[StepEvent]:
        """Advance every row by one token; returns the events of this step."""
        self._drop_cancelled()
        logits = []
        if self._rows:
            logits.append(self._forward_running())
        if self._pending and (not self._rows or _joinable(self._cache)):
            logits.append(self._prefill_pending())
        if not logits:
            return []
        tokens = self._select(torch.cat(logits))
        return self._advance(tokens)

    def run(self) -> list[StepEvent]:
        """Decode to the end; returns each row's final event, in row order."""
        finals: dict[Hashable, StepEvent] = {}
        while len(self):
            for event in self.step():
                if event.done:
                    finals[event.row] = event
        return list(finals.values())

    # ---- internals -----------------------------------------------------------------------
    def _forward_running(self) -> Tensor:
        assert self._mask is not None and self._positions is not None and self._last is not None
        self._mask = torch.cat([self._mask, self._mask.new_ones((self._mask.shape[0], 1))], 1)
        out = self.llm(input_ids=self._last[:, None], attention_mask=self._mask,
                       position_ids=self._positions[:, None], use_cache=True, logits_to_keep=1,
                       **{self._cache_kw: self._cache})
        self._cache = _output_cache(out)
        self._positions = self._positions + 1
        return out.logits[:, -1].float()

    def _prefill_pending(self) -> Tensor:
        rows, embeds, mask = self._merge_pending()
        mask = mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.llm(inputs_embeds=embeds.to(self.device), attention_mask=mask,
                       position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = _output_cache(out)
        next_pos = mask.sum(1)
        if not self._rows:
            self._cache, self._mask, self._positions = cache, mask, next_pos
        else:
            assert self._mask is not None and self._positions is not None
            gap = self._mask.shape[1] - mask.shape[1]
            if gap > 0:
                _left_pad_cache(cache, gap)
                mask = torch.cat([mask.new_zeros((mask.shape[0], gap)), mask], 1)
            elif gap < 0:
                _left_pad_cache(self._cache, -gap)
                self._mask = torch.cat([self._mask.new_zeros((self._mask.shape[0], -gap)),
                                        self._mask], 1)
            _join_caches(self._cache, cache)
            self._mask = torch.cat([self._mask, mask])
            self._positions = torch.cat([self._positions, next_pos])
        self._rows.extend(rows)
        return out.logits[:, -1].float()

    def _merge_pending(self) -> tuple[list[_Row], Tensor, Tensor]:
        """All queued rows as one left-padded batch."""
        pending, self._pending = self._pending, []
        width = max(e.shape[1] for _, e, _ in pending)
        rows, embeds, masks = [], [], []
        for r, e, m in pending:
            gap = width - e.shape[1]
            rows.extend(r)
            embeds.append(F.pad(e, (0, 0, gap, 0)))
            masks.append(F.pad(m, (gap, 0)))
        return rows, torch.cat(embeds), torch.cat(masks)

    def _select(self, logits: Tensor) -> list[int]:
        """One next token per row: greedy or sampled, within the row's constraint."""
        for i, row in enumerate(self._rows):
            constraint = row.params.constraint
            allowed = constraint.allowed_tokens(row.text.tokens) if constraint else None
            if allowed is not None:
                keep = torch.full_like(logits[i], float("-inf"))
                index = torch.as_tensor(list(allowed), dtype=torch.long, device=logits.device)
                keep[index] = logits[i, index]
                logits[i] = keep
        tokens = logits.argmax(-1).tolist()
        for i, row in enumerate(self._rows):
            if row.params.do_sample:
                tokens[i] = _sample(logits[i], row.params, row.generator)
        return tokens

    def _advance(self, tokens: list[int]) -> list[StepEvent]:
        events, keep = [], []
        for i, (row, token) in enumerate(zip(self._rows, tokens, strict=True)):
            if token in self.eos:
                events.append(row.event(reason="stop"))
                continue
            delta = row.text.add(token)
            if row.text.stopped:
                events.append(row.event(delta, "stop"))
            elif len(row.text.tokens) >= row.params.max_new_tokens:
                events.append(row.event(delta, "length"))
            else:
                if delta:
                    events.append(row.event(delta))
                keep.append(i)
        self._last = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self._keep(keep)
        return events

    def _drop_cancelled(self) -> None:
        with self._cancel_lock:
            cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return
        kept_pending = []
        for rows, e, m in self._pending:
            idx = [i for i, r in enumerate(rows) if r.key not in cancelled]
            if idx:
                kept_pending.append(([rows[i] for i in idx], e[idx], m[idx]))
        self._pending = kept_pending
        self._keep([i for i, r in enumerate(self._rows) if r.key not in cancelled])

    def _keep(self, indices: list[int]) -> None:
        """Keep only these running rows (finished and cancelled rows leave the batch)."""
        if len(indices) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in indices]
        if not indices:
            self._cache = self._mask = self._positions = self._last = None
            return
        index = torch.tensor(indices, dtype=torch.long, device=self.device)
        self._cache.batch_select_indices(index)
        assert self._mask is not None and self._positions is not None and self._last is not None
        self._mask, self._positions, self._last = (self._mask[index], self._positions[index],
                                                   self._last[index])
        self._trim()

    def _trim(self) -> None:
        """Drop leading cache positions no remaining row attends to: with rows joining and
        leaving a batch that never empties, the cache would otherwise only ever grow."""
        assert self._mask is not None
        used = self._mask.any(0).nonzero()
        start = int(used[0]) if used.numel() else 0
        if start == 0 or not _joinable(self._cache):
            return
        for layer in self._cache.layers:
            layer.keys = layer.keys[:, :, start:]
            layer.values = layer.values[:, :, start:]
        self._mask = self._mask[:, start:]


def _output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


GREEDY_BELOW = 1e-5  # a sampling temperature below this decodes greedily (as vLLM does)


def _sample(logits: Tensor, params: DecodeParams, generator: torch.Generator | None) -> int:
    """Temperature, then nucleus (top-p) filtering, then one draw. A temperature below
    ``GREEDY_BELOW`` picks the top token (a client may send 5e-324: it is 0 in float32, and
    logits / 0 made NaN probabilities); otherwise the logits are shifted to a maximum of 0
    first (softmax does not change), so a small temperature cannot overflow the top one."""
    if params.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    scores = (logits - logits.max()) / params.temperature
    if params.top_p < 1.0:
        ordered, index = scores.sort(descending=True)
        probs = ordered.softmax(-1)
        beyond = probs.cumsum(-1) - probs > params.top_p  # always keeps the top token
        scores = scores.scatter(0, index[beyond], float("-inf"))
    probs = scores.softmax(-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))
