"""Text of a row being decoded, released as deltas that never need taking back: stop strings,
half-decoded multi-byte characters and whitespace the final text strips are held back until
they are settled."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

_INCOMPLETE = "\ufffd"  # what a tokenizer decodes half of a multi-byte character to


def cut_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """``text`` up to the first occurrence of any stop string."""
    for s in stop or ():
        pos = text.find(s)
        if s and pos >= 0:
            text = text[:pos]
    return text


class TextAssembler:
    """Turns one row's growing token list into text deltas.

    Text is held back while it could still change: trailing and leading whitespace (the final
    text is stripped), an incomplete multi-byte character, and a suffix that may be the start
    of a stop string. So the deltas always concatenate to a prefix of the final text.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
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
        cut = cut_at_stop(text, self.stop)
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
        """(final text, the delta still to send)."""
        final = cut_at_stop(self._decode(), self.stop).strip()
        if not final.startswith(self.emitted):
            log.warning("streamed text %r is not a prefix of the final text %r", self.emitted,
                        final)
            return final, ""
        return final, final[len(self.emitted):]
