"""LLaVA-style conversations: validation, chat templates, tokenisation with labels, batching.

A sample is a list of turns ``{"from": "human"|"gpt"|"system", "value": str}``. The image is a
single ``<image>`` placeholder that becomes a run of ``num_image_tokens`` image-token ids, whose
embeddings the model later replaces with vision features. Labels are -100 everywhere except on
the assistant replies (and their end-of-turn suffix, so the model learns to stop).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mova.tokenizers import IMAGE_TOKEN

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
HUMAN, GPT, SYSTEM = "human", "gpt", "system"
_ROLE_ALIASES = {HUMAN: HUMAN, "user": HUMAN, GPT: GPT, "assistant": GPT, SYSTEM: SYSTEM}


@dataclass(frozen=True)
class ChatTemplate:
    """How system, user and assistant turns are wrapped in text for one LLM family."""

    name: str
    system: str
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    add_bos: bool = False  # prepend the tokenizer's BOS id (Llama-family tokenizers)
    answer_lead: str = ""
    """Unsupervised text between ``assistant_prefix`` and each answer in training and history,
    absent from the generation prompt (vicuna: the prompt ends at ``ASSISTANT:``, an answer
    reads ``ASSISTANT: answer</s>``)."""


TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate(
        name="chatml",
        system="You are a helpful assistant.",
        system_prefix="<|im_start|>system\n",
        system_suffix="<|im_end|>\n",
        user_prefix="<|im_start|>user\n",
        user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        assistant_suffix="<|im_end|>\n",
    ),
    # LLaVA-1.5 / released MoVA ``vicuna_v1`` (SeparatorStyle.TWO, sep " ", sep2 "</s>"):
    # "{sys} USER: {q} ASSISTANT: {a}</s>USER: ..."; the generation prompt ends at "ASSISTANT:".
    "vicuna_v1": ChatTemplate(
        name="vicuna_v1",
        system=(
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
        system_prefix="",
        system_suffix=" ",
        user_prefix="USER: ",
        user_suffix=" ",
        assistant_prefix="ASSISTANT:",
        assistant_suffix="</s>",
        add_bos=True,
        answer_lead=" ",
    ),
    "llama3": ChatTemplate(
        name="llama3",
        system=(
            "You are a helpful language and vision assistant. You are able to understand the "
            "visual content that the user provides, and assist the user with a variety of tasks "
            "using natural language."
        ),
        system_prefix="<|start_header_id|>system<|end_header_id|>\n\n",
        system_suffix="<|eot_id|>",
        user_prefix="<|start_header_id|>user<|end_header_id|>\n\n",
        user_suffix="<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_suffix="<|eot_id|>",
        add_bos=True,
    ),
}
# The released MoVA-8B template (``mova_llama3``, SeparatorStyle.MPT): the same layout as
# "llama3", kept under the authors' name; <|begin_of_text|> is the BOS id (add_bos), not text.
TEMPLATES["mova_llama3"] = dataclasses.replace(TEMPLATES["llama3"], name="mova_llama3")


def get_template(name: str) -> ChatTemplate:
    """Look up a chat template preset by name."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def _normalise_role(turn: Any, index: int) -> str:
    if not isinstance(turn, dict):
        raise ValueError(f"turn {index}: expected a dict with 'from' and 'value', got {turn!r}")
    if "from" not in turn or "value" not in turn:
        raise ValueError(f"turn {index}: expected keys 'from' and 'value', got {sorted(turn)}")
    role = turn["from"]
    if role not in _ROLE_ALIASES:
        raise ValueError(
            f"turn {index}: unknown role {role!r}; expected one of {sorted(_ROLE_ALIASES)}"
        )
    return _ROLE_ALIASES[role]


def validate_turns(turns: Sequence[dict], *, for_generation: bool = False) -> list[dict]:
    """Check a conversation and return normalised copies (roles mapped to human/gpt/system).

    After an optional leading system turn, turns alternate human, gpt, ...; the last turn is
    gpt for training and human when ``for_generation`` (the model writes the next reply).
    """
    if isinstance(turns, (str, bytes)) or not isinstance(turns, Sequence) or len(turns) == 0:
        raise ValueError(f"turns: expected a non-empty list of turns, got {turns!r}")
    out: list[dict] = []
    for i, turn in enumerate(turns):
        role = _normalise_role(turn, i)
        if not isinstance(turn["value"], str):
            raise ValueError(
                f"turn {i}: expected a str value, got {type(turn['value']).__name__}"
            )
        out.append({"from": role, "value": turn["value"]})
    start = 1 if out[0]["from"] == SYSTEM else 0
    if start == len(out):
        raise ValueError("turns: only a system turn; expected at least one human turn")
    for i in range(start, len(out)):
        expected = HUMAN if (i - start) % 2 == 0 else GPT
        if out[i]["from"] != expected:
            where = " (system is allowed only as turn 0)" if out[i]["from"] == SYSTEM else ""
            raise ValueError(
                f"turn {i}: expected role {expected!r} (turns alternate human/gpt), "
                f"got {out[i]['from']!r}{where}"
            )
    last = out[-1]["from"]
    if for_generation and last != HUMAN:
        raise ValueError(
            f"turn {len(out) - 1}: for_generation needs a last human turn, got {last!r}"
        )
    if not for_generation and last != GPT:
        raise ValueError(
            f"turn {len(out) - 1}: last turn must be 'gpt' for training, got {last!r} "
            "(pass for_generation=True to build a prompt)"
        )
    return out


def user_questions(turns: Sequence[dict]) -> list[str]:
    """The texts of the human turns, in order (the questions the gate conditions on)."""
    return [t["value"] for i, t in enumerate(turns) if _normalise_role(t, i) == HUMAN]


def gate_text(questions: Sequence[str], image_token: str = IMAGE_TOKEN) -> str:
    """The adapter gate's BERT input: ``"question {j}: {q.lower()}\\n\\n"`` joined, j from 0."""
    pattern = re.compile(r"\s*" + re.escape(image_token) + r"\s*")
    parts = []
    for j, question in enumerate(questions):
        if not isinstance(question, str):
            raise ValueError(f"questions[{j}]: expected a str, got {type(question).__name__}")
        clean = pattern.sub(" ", question).strip()
        parts.append(f"question {j}: {clean.lower()}\n\n")
    return "".join(parts)


def _segments(
    turns: list[dict], template: ChatTemplate, for_generation: bool
) -> list[tuple[str, bool]]:
    """The prompt as (text, supervised) pieces, in order; empty pieces are dropped."""
    segs: list[tuple[str, bool]] = []
    body = turns
    system = template.system
    if turns[0]["from"] == SYSTEM:
        system, body = turns[0]["value"], turns[1:]
    if system:
        segs += [(template.system_prefix, False), (system, False), (template.system_suffix, False)]
    for turn in body:
        if turn["from"] == HUMAN:
            segs += [(template.user_prefix, False), (turn["value"], False),
                     (template.user_suffix, False)]
        else:
            supervised = not for_generation
            segs += [(template.assistant_prefix, False), (template.answer_lead, False),
                     (turn["value"], supervised), (template.assistant_suffix, supervised)]
    if for_generation:
        segs.append((template.assistant_prefix, False))
    return [(text, sup) for text, sup in segs if text]


def _with_image_placeholder(turns: list[dict], has_image: bool, image_token: str) -> list[dict]:
    """Check the image-token count and prepend ``<image>\\n`` to the first human turn if absent."""
    counts = [t["value"].count(image_token) for t in turns]
    total = sum(counts)
    if not has_image:
        if total:
            raise ValueError(
                f"turns: found {total} {image_token!r} token(s) but has_image=False; expected 0"
            )
        return turns
    if total > 1:
        raise ValueError(f"turns: found {total} {image_token!r} tokens; expected exactly one")
    if total == 1:
        index = counts.index(1)
        if turns[index]["from"] != HUMAN:
            raise ValueError(
                f"turn {index}: {image_token!r} must be in a human turn, "
                f"not a {turns[index]['from']!r} turn"
            )
        return turns
    out = [dict(t) for t in turns]
    first_human = next(i for i, t in enumerate(out) if t["from"] == HUMAN)
    out[first_human]["value"] = f"{image_token}\n{out[first_human]['value']}"
    return out


def render_prompt(
    turns: Sequence[dict],
    template: ChatTemplate,
    *,
    has_image: bool = True,
    image_token: str = IMAGE_TOKEN,
    for_generation: bool = False,
) -> str:
    """The conversation as one string (image placeholder not expanded), for inspection."""
    norm = validate_turns(turns, for_generation=for_generation)
    norm = _with_image_placeholder(norm, has_image, image_token)
    return "".join(text for text, _ in _segments(norm, template, for_generation))


def _image_token_id(tokenizer: Any, image_token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    unk = getattr(tokenizer, "unk_token", None)
    if token_id is None or (token_id == tokenizer.unk_token_id and image_token != unk):
        raise ValueError(
            f"image_token {image_token!r} is not in the tokenizer's vocabulary; "
            "add it as a special token first"
        )
    return int(token_id)


def tokenize_conversation(
    turns: Sequence[dict],
    tokenizer: Any,
    template: ChatTemplate,
    num_image_tokens: int,
    *,
    has_image: bool = True,
    image_token: str = IMAGE_TOKEN,
    max_length: int | None = None,
    for_generation: bool = False,
) -> dict[str, list[int]]:
    """Tokenise a conversation segment by segment into ``input_ids`` and ``labels``.

    Each template piece is tokenised on its own, so the label boundaries are exact and a prompt
    built for generation is a token-exact prefix of the training sequence.
    """
    if has_image and (
        isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int)
        or num_image_tokens < 1
    ):
        raise ValueError(f"num_image_tokens: expected an int >= 1, got {num_image_tokens!r}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length: expected None or an int >= 1, got {max_length!r}")
    norm = validate_turns(turns, for_generation=for_generation)
    norm = _with_image_placeholder(norm, has_image, image_token)
    image_id = _image_token_id(tokenizer, image_token) if has_image else None

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    input_ids: list[int] = []
    labels: list[int] = []
    if template.add_bos and getattr(tokenizer, "bos_token_id", None) is not None:
        input_ids.append(int(tokenizer.bos_token_id))
        labels.append(IGNORE_INDEX)
    image_start = -1
    for text, supervised in _segments(norm, template, for_generation):
        pieces = text.split(image_token)
        for k, piece in enumerate(pieces):
            if k > 0:  # only one placeholder exists (checked above)
                image_start = len(input_ids)
                input_ids += [image_id] * num_image_tokens
                labels += [IGNORE_INDEX] * num_image_tokens
            ids = encode(piece) if piece else []
            input_ids += ids
            labels += ids if supervised else [IGNORE_INDEX] * len(ids)

    if max_length is not None and len(input_ids) > max_length:
        input_ids, labels = _cut(input_ids, labels, max_length, for_generation,
                                 image_start + num_image_tokens if has_image else 0)
    return {"input_ids": input_ids, "labels": labels}


def _cut(input_ids: list[int], labels: list[int], max_length: int, for_generation: bool,
         image_end: int) -> tuple[list[int], list[int]]:
    """The first ``max_length`` tokens, unless that would cut a generation prompt or the image
    run (which ends at ``image_end``)."""
    if for_generation:
        raise ValueError(
            f"max_length={max_length}: the generation prompt has {len(input_ids)} tokens "
            "and cutting it would drop the assistant prefix"
        )
    if image_end > max_length:
        raise ValueError(
            f"max_length={max_length}: the image run ends at token {image_end - 1} and would "
            "be cut; raise max_length"
        )
    if all(label == IGNORE_INDEX for label in labels[:max_length]):
        logger.warning("max_length=%d leaves no supervised tokens in a sample", max_length)
    return input_ids[:max_length], labels[:max_length]


def collate(
    samples: Sequence[dict], pad_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad tokenised samples into a batch: ``input_ids``, ``labels`` and ``attention_mask``.

    Use ``padding_side="left"`` for generation so every prompt ends at the last position.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
    if len(samples) == 0:
        raise ValueError("samples: expected at least one sample, got an empty sequence")
    for i, sample in enumerate(samples):
        if "input_ids" not in sample or "labels" not in sample:
            raise ValueError(f"samples[{i}]: expected keys 'input_ids' and 'labels'")
        if len(sample["input_ids"]) != len(sample["labels"]):
            raise ValueError(
                f"samples[{i}]: input_ids has {len(sample['input_ids'])} tokens but labels "
                f"has {len(sample['labels'])}"
            )
    width = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, sample in enumerate(samples):
        n = len(sample["input_ids"])
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[i, cols] = torch.as_tensor(sample["input_ids"], dtype=torch.long)
        labels[i, cols] = torch.as_tensor(sample["labels"], dtype=torch.long)
        attention_mask[i, cols] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
