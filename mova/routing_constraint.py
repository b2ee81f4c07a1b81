"""Constrained routing decode: the LLM may only write a well-formed routing reply.

A free routing decode can ramble to its token limit on a reply the strict parser
(:func:`mova.routing.parse_routing`) turns into "no expert". :class:`RoutingConstraint` is a
:class:`mova.decoding.TokenConstraint` that keeps every row inside the well-formed replies:

    at most 2 leading whitespace characters, then either ``none`` (any case) with an optional
    period, or 1..max_experts distinct pool letters (any case) separated by a comma and/or
    whitespace, then optional whitespace and an optional period (whitespace runs of at most 4
    characters); nothing after the period.

End-of-sequence is allowed only once the reply is complete. So the decode stops in a few steps
and its reply always parses to what it says; and since the mask only removes tokens that would
leave that language, greedy decoding within it equals the free greedy reply whenever that reply
is well formed. Every well-formed reply is one the strict parser accepts.

The constraint works on token texts (read once per tokenizer by decoding each token after a
fixed anchor token, so leading spaces are kept), not on tokenizer internals, so it works with
byte-level BPE and SentencePiece vocabularies alike.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import regex

from mova.decoding import DecodeParams
from mova.routing import LETTERS

log = logging.getLogger(__name__)

_WS_RUN = 4
_GRAMMAR_CHARS = set(" \t\n\r,.") | set("noneNONE")


class RoutingConstraint:
    """Allowed next tokens of a routing reply (see the module docstring for the language)."""

    def __init__(self, tokenizer: Any, eos_ids: Iterable[int], num_experts: int,
                 max_experts: int) -> None:
        if not 1 <= num_experts <= len(LETTERS):
            raise ValueError(f"num_experts must be in 1..{len(LETTERS)}, got {num_experts}")
        if max_experts < 1:
            raise ValueError(f"max_experts must be >= 1, got {max_experts}")
        self.eos_ids = sorted(set(eos_ids))
        self.max_experts = min(max_experts, num_experts)
        self.letters = LETTERS[:num_experts]
        pool = f"[{self.letters}{self.letters.lower()}]"
        ws, lead = rf"\s{{0,{_WS_RUN}}}", r"\s{0,2}"
        sep = rf"(?:{ws},{ws}|\s{{1,{_WS_RUN}}})"
        self._none = regex.compile(rf"{lead}(?i:none)\.?")
        self._list = regex.compile(rf"{lead}{pool}(?:{sep}{pool}){{0,{self.max_experts - 1}}}"
                                   rf"{ws}\.?")
        self.token_text = _token_texts(tokenizer, set(self.letters + self.letters.lower()))
        log.debug("routing constraint: %d candidate tokens", len(self.token_text))

    # ---- the language ----------------------------------------------------------------------
    def _distinct(self, text: str) -> bool:
        picked = [c.upper() for c in text if c.isalpha()]
        return len(picked) == len(set(picked))

    def viable(self, text: str) -> bool:
        """Whether ``text`` is the start of a well-formed reply."""
        if self._none.fullmatch(text, partial=True):
            return True
        return bool(self._list.fullmatch(text, partial=True)) and self._distinct(text)

    def complete(self, text: str) -> bool:
        """Whether ``text`` is a whole well-formed reply."""
        if self._none.fullmatch(text):
            return True
        return bool(self._list.fullmatch(text)) and self._distinct(text)

    @property
    def regex(self) -> str:
        """The same language as one portable regular expression (no flags, no lookaround),
        for engines that constrain decoding by a regex (vLLM's structured outputs). Distinct
        letters are spelled out as a tree of alternatives: at most
        ``n + n(n-1) + ... `` branches for ``n`` pool letters."""
        return routing_regex(self.letters, self.max_experts)

    # ---- TokenConstraint ---------------------------------------------------------------------
    def text_of(self, generated: Sequence[int]) -> str:
        return "".join(self.token_text.get(int(t), "\0") for t in generated)

    def allowed_tokens(self, generated: Sequence[int]) -> list[int]:
        text = self.text_of(generated)
        allowed = [t for t, piece in self.token_text.items() if self.viable(text + piece)]
        if self.complete(text):
            allowed.extend(self.eos_ids)
        return allowed or list(self.eos_ids)  # nothing fits (cannot happen with a sane vocab)


def routing_regex(letters: str, max_experts: int) -> str:
    """A flag-free regex of the routing replies over pool ``letters`` (see the module
    docstring), each letter at most once."""
    ws, space = f"[ \\t\\n\\r]{{0,{_WS_RUN}}}", "[ \\t\\n\\r]"
    sep = f"(?:{ws},{ws}|{space}{{1,{_WS_RUN}}})"

    def either(letter: str) -> str:
        return f"[{letter.upper()}{letter.lower()}]"

    def tail(used: str, left: int) -> str:
        if left == 0:
            return ""
        branches = [f"{either(c)}{tail(used + c, left - 1)}" for c in letters if c not in used]
        return f"(?:{sep}(?:{'|'.join(branches)}))?" if branches else ""

    first = "|".join(f"{either(c)}{tail(c, max_experts - 1)}" for c in letters)
    none = "".join(either(c) for c in "none")
    return f"{space}{{0,2}}(?:{none}|(?:{first}){ws})\\.?"


def _token_texts(tokenizer: Any, letters: set[str]) -> dict[int, str]:
    """Token id -> its text in context, for every token made only of grammar characters."""
    anchor = tokenizer.encode("a", add_special_tokens=False)
    prefix = tokenizer.decode(anchor)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[*anchor, t] for t in range(size)])
    allowed_chars = _GRAMMAR_CHARS | letters
    out: dict[int, str] = {}
    for token_id, text in enumerate(texts):
        if token_id in special or not text.startswith(prefix):
            continue
        piece = text[len(prefix):]
        if piece and set(piece) <= allowed_chars and _letter_runs_ok(piece):
            out[token_id] = piece
    return out


def _letter_runs_ok(piece: str) -> bool:
    """Letters stand alone in a reply, except inside "none": "cab" can never fit."""
    runs = regex.findall(r"[^\W\d_]+", piece)
    return all(len(run) == 1 or run.lower() in "none" for run in runs)


def routing_constraint_for(model: Any, enabled: bool = True) -> RoutingConstraint | None:
    """The routing constraint of a :class:`mova.modeling.MoVAModel` (built once per model), or
    None when ``enabled`` is false (the free decode)."""
    if not enabled:
        return None
    cached = getattr(model, "_routing_constraint", None)
    if cached is None:
        cfg = model.config.routing
        cached = RoutingConstraint(model.tokenizer, model.eos_ids(), len(model.expert_names),
                                   cfg.max_experts)
        model._routing_constraint = cached
    return cached


def constrained_routing_params(model: Any, enabled: bool = True) -> DecodeParams:
    """The model's routing decode settings, with the constraint when ``enabled``."""
    base = model.routing_params()
    return DecodeParams(max_new_tokens=base.max_new_tokens, do_sample=base.do_sample,
                        temperature=base.temperature, top_p=base.top_p, seed=base.seed,
                        stop=base.stop, constraint=routing_constraint_for(model, enabled))


def use_constrained_routing(model: Any, enabled: bool = True) -> Any:
    """Make ``model.route`` and ``model.generate`` decode routing replies under the
    constraint (or free again with ``enabled=False``): the switch serving uses, for offline
    generation that must answer exactly as the server does. Returns the model."""
    if not enabled:
        model.__dict__.pop("routing_params", None)
        return model
    free = type(model).routing_params.__get__(model)
    constraint = routing_constraint_for(model)

    def routing_params() -> DecodeParams:
        base = free()
        return DecodeParams(max_new_tokens=base.max_new_tokens, do_sample=base.do_sample,
                            temperature=base.temperature, top_p=base.top_p, seed=base.seed,
                            stop=base.stop, constraint=constraint)

    model.routing_params = routing_params
    return model
