"""Stage 1 routing: the routing prompt, its strict reply parser, and routing-instruction data.

The LLM routes by answering a multiple-choice style prompt that lists a lettered pool of vision
experts (descriptions only, never model names). Letters follow the order of the pool as given,
so this module works on plain data (``PoolEntry``) and never touches the expert registry.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

PoolEntry = tuple[str, Sequence[str]]
"""(expert name, routing descriptions): at least one description, none naming the model."""

_NONE_ANSWER = "None"
_SEPARATORS = re.compile(r"[,\s]+")


def _check_pool_size(num_experts: int, what: str) -> None:
    if not 1 <= num_experts <= len(LETTERS):
        raise ValueError(
            f"{what} must be between 1 and {len(LETTERS)} (one letter each), got {num_experts}"
        )


def _check_max_experts(max_experts: int) -> None:
    if max_experts < 1:
        raise ValueError(f"max_experts must be >= 1, got {max_experts}")


def _one_line(text: str) -> str:
    """Collapse all whitespace so a description stays on its own lettered line."""
    return " ".join(text.split())


def build_routing_prompt(
    question: str,
    descriptions: Sequence[str],
    image_token: str = "<image>",
    max_experts: int = 3,
) -> str:
    """User-message text asking the LLM which pooled experts (by letter) suit the question.

    The image placeholder goes on the first line; any image token inside the question is
    removed, since the image is already placed there.
    """
    if not image_token:
        raise ValueError("image_token must be a non-empty string")
    _check_pool_size(len(descriptions), "number of descriptions in the pool")
    _check_max_experts(max_experts)
    clean_question = _one_line(question.replace(image_token, " "))
    if not clean_question:
        raise ValueError(f"question is empty (after removing {image_token!r}): {question!r}")
    lines = [
        image_token,
        "A pool of vision models is available to help answer a question about this image. "
        "Each model is described by its strengths and weaknesses:",
    ]
    for letter, description in zip(LETTERS, descriptions, strict=False):
        text = _one_line(description)
        if not text:
            raise ValueError(f"description for letter {letter} is empty")
        lines.append(f"{letter}. {text}")
    lines.append(f"Question: {clean_question}")
    lines.append(
        f"Answer with the letters of the most suitable models (up to {max_experts}), "
        f'separated by commas, or "{_NONE_ANSWER}" if no model is needed.'
    )
    return "\n".join(lines)


# ---- the released model's routing prompt ------------------------------------------------------
# The authors' text from the released MoVA code (TempleX98/MoVA, ``mova/constants.py``), kept
# verbatim: the released LLM's routing behaviour was trained on exactly this wording, so it is
# offered for imported checkpoints only; models we train use :func:`build_routing_prompt`.
RELEASED_ROUTING_INTRO = (
    "You are a helpful assistant router. Based on the visual content, questions, and model pool "
    "the user provides, you need to consider the expertise of these models to select the most 3 "
    "suitable models to help you answer the questions. Answer with the model's letter from the "
    "given choices directly. If no models are selected, just answer 'none'."
)
"""The released routing prompt's first line (authors' text, verbatim; "most 3" included)."""

ROUTING_PROMPT_STYLES = ("mova", "released")


def build_released_routing_prompt(question: str, descriptions: Sequence[str],
                                  image_token: str = "<image>") -> str:
    """The released MoVA routing user turn: ``<image>\n`` + intro + lettered pool + question.

    Built as the released code does: intro, ``"\nModel pool:"``, then per expert ``"\n"`` +
    letter + ``". "`` + description, then ``"\n\nQuestion:\n"`` + the question as given
    (image placeholders removed, as the image already leads the turn, and ends stripped).
    """
    if not image_token:
        raise ValueError("image_token must be a non-empty string")
    _check_pool_size(len(descriptions), "number of descriptions in the pool")
    clean = question.replace(image_token + "\n", "").replace(image_token, "").strip()
    if not clean:
        raise ValueError(f"question is empty (after removing {image_token!r}): {question!r}")
    text = RELEASED_ROUTING_INTRO + "\nModel pool:"
    for letter, description in zip(LETTERS, descriptions, strict=False):
        if not description or "\n" in description:
            raise ValueError(f"description for letter {letter} must be one non-empty line")
        text += "\n" + letter + ". " + description
    return f"{image_token}\n{text}\n\nQuestion:\n{clean}"


def render_routing_prompt(style: str, question: str, descriptions: Sequence[str],
                          image_token: str = "<image>", max_experts: int = 3) -> str:
    """The routing user turn in ``style``: ``mova`` (ours) or ``released`` (the authors')."""
    if style == "mova":
        return build_routing_prompt(question, descriptions, image_token=image_token,
                                    max_experts=max_experts)
    if style == "released":
        return build_released_routing_prompt(question, descriptions, image_token=image_token)
    raise ValueError(f"routing prompt style {style!r}; expected one of {ROUTING_PROMPT_STYLES}")


def format_routing_answer(indices: Sequence[int]) -> str:
    """Target text for routing training: pool indices as letters, e.g. [0, 2] -> "A, C"."""
    if not indices:
        return _NONE_ANSWER
    for index in indices:
        if not 0 <= index < len(LETTERS):
            raise ValueError(f"pool index must be in [0, {len(LETTERS)}), got {index}")
    return ", ".join(LETTERS[index] for index in indices)


def parse_routing(reply: str, num_experts: int, max_experts: int = 3) -> list[int]:
    """Strictly parse a routing reply into distinct 0-based pool indices, in reply order.

    Accepted: single letters (any case) separated by commas and/or whitespace (empty fields
    from doubled separators are ignored), optionally followed by one trailing period; or the
    word "none" alone. Duplicates collapse to their first occurrence, then the first
    ``max_experts`` are kept. Anything else selects nothing: a word ("NONE" in a list,
    "DINOv2"), a letter with a suffix ("A1", "AB", "A." inside the list, so "A. C" selects
    nothing), or any letter outside the pool (even past the first ``max_experts``).
    The caller strips end-of-sequence text before parsing.
    """
    _check_pool_size(num_experts, "num_experts")
    _check_max_experts(max_experts)
    text = reply.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    if text.lower() == _NONE_ANSWER.lower():
        return []
    selected: list[int] = []
    for token in _SEPARATORS.split(text):
        if not token:
            continue
        if len(token) != 1 or token.upper() not in LETTERS:
            logger.debug("routing reply %r: token %r is not a single letter", reply, token)
            return []
        index = LETTERS.index(token.upper())
        if index >= num_experts:
            logger.debug("routing reply %r: letter %r is outside the pool", reply, token)
            return []
        if index not in selected:
            selected.append(index)
    return selected[:max_experts]


def mask_from_indices(indices: Sequence[int], num_experts: int) -> list[int]:
    """0/1 expert mask of length ``num_experts`` with ones at ``indices``."""
    if num_experts < 0:
        raise ValueError(f"num_experts must be >= 0, got {num_experts}")
    mask = [0] * num_experts
    for index in indices:
        if not 0 <= index < num_experts:
            raise ValueError(f"expert index must be in [0, {num_experts}), got {index}")
        mask[index] = 1
    return mask


def indices_from_names(names: Sequence[str], pool_names: Sequence[str]) -> list[int]:
    """Pool indices of expert ``names`` (order kept, duplicates collapsed)."""
    if len(set(pool_names)) != len(pool_names):
        raise ValueError(f"pool_names has duplicate names: {list(pool_names)}")
    position = {name: i for i, name in enumerate(pool_names)}
    indices: list[int] = []
    for name in names:
        if name not in position:
            raise ValueError(f"unknown expert {name!r}; the pool has {list(pool_names)}")
        if position[name] not in indices:
            indices.append(position[name])
    return indices


@dataclass(frozen=True)
class RoutingExample:
    """One routing-instruction sample: prompt, target answer, and the presented expert order."""

    prompt: str
    answer: str
    pool: tuple[str, ...]


def _check_augmentation(pool: Sequence[PoolEntry], min_pool: int, keep_positives_prob: float,
                        max_experts: int) -> None:
    names = [name for name, _ in pool]
    _check_pool_size(len(names), "pool size")
    _check_max_experts(max_experts)
    if len(set(names)) != len(names):
        raise ValueError(f"pool has duplicate expert names: {names}")
    if not 1 <= min_pool <= len(names):
        raise ValueError(
            f"min_pool must be between 1 and the pool size {len(names)}, got {min_pool}"
        )
    if not 0.0 <= keep_positives_prob <= 1.0:
        raise ValueError(f"keep_positives_prob must be in [0, 1], got {keep_positives_prob}")
    for name, descriptions in pool:
        if isinstance(descriptions, str) or len(descriptions) == 0:
            raise ValueError(
                f"expert {name!r} needs a sequence of >= 1 descriptions, got {descriptions!r}"
            )


def augment_routing_example(
    question: str,
    pool: Sequence[PoolEntry],
    positives: Sequence[str],
    rng: random.Random,
    *,
    shuffle: bool = True,
    min_pool: int = 2,
    keep_positives_prob: float = 0.9,
    image_token: str = "<image>",
    max_experts: int = 3,
) -> RoutingExample:
    """Build an augmented routing-instruction sample so the router reads descriptions, not slots.

    One random description per expert, a shuffled pool order, and a pool truncated to a random
    size in [min_pool, len(pool)]. With probability ``keep_positives_prob`` every positive stays
    in the presented pool (the size grows to fit them if needed); otherwise the kept experts are
    a uniform random subset, so positives may drop out and are then absent from the answer.
    The answer lists the remaining positives in presented-letter order, at most ``max_experts``.
    Deterministic given the state of ``rng``.
    """
    names = [name for name, _ in pool]
    _check_augmentation(pool, min_pool, keep_positives_prob, max_experts)
    positive_indices = set(indices_from_names(positives, names))

    chosen = [rng.choice(list(descriptions)) for _, descriptions in pool]
    order = list(range(len(names)))
    if shuffle:
        rng.shuffle(order)
    size = rng.randint(min_pool, len(names))
    if rng.random() < keep_positives_prob:
        others = [i for i in range(len(names)) if i not in positive_indices]
        n_others = max(0, size - len(positive_indices))
        kept = positive_indices | set(rng.sample(others, n_others))
    else:
        kept = set(rng.sample(range(len(names)), size))
    presented = [i for i in order if i in kept]

    answer_indices = [slot for slot, i in enumerate(presented) if i in positive_indices]
    prompt = build_routing_prompt(
        question,
        [chosen[i] for i in presented],
        image_token=image_token,
        max_experts=max_experts,
    )
    return RoutingExample(
        prompt=prompt,
        answer=format_routing_answer(answer_indices[:max_experts]),
        pool=tuple(names[i] for i in presented),
    )


def routing_accuracy(predicted: Sequence[Sequence[int]], target: Sequence[Sequence[int]]) -> float:
    """Fraction of samples whose predicted expert set equals the target set exactly."""
    if len(predicted) != len(target):
        raise ValueError(f"predicted has {len(predicted)} samples but target has {len(target)}")
    if not target:
        raise ValueError("routing_accuracy needs at least one sample, got none")
    hits = sum(set(p) == set(t) for p, t in zip(predicted, target, strict=True))
    return hits / len(target)
