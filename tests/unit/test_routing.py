"""Tests for the routing prompt, the strict reply parser and routing-instruction augmentation."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mova.routing import (
    LETTERS,
    RoutingExample,
    augment_routing_example,
    build_routing_prompt,
    format_routing_answer,
    indices_from_names,
    mask_from_indices,
    parse_routing,
    routing_accuracy,
)

POOL = [
    ("dinov2", ["general object-level image understanding", "fine-grained visual features"]),
    ("vary", ["reading dense text in documents", "optical character recognition on pages"]),
    ("codetr", ["detecting and localising objects", "bounding boxes of many objects"]),
    ("pix2struct", ["parsing screenshots and web pages", "understanding rendered layouts"]),
    ("deplot", ["turning charts into tables", "reading values off plots"]),
    ("biomedclip", ["medical images such as x-rays", "radiology and pathology pictures"]),
    ("sam", ["segmenting regions at pixel level", "precise object masks"]),
]
NAMES = [name for name, _ in POOL]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("A, C", [0, 2]),
        ("c,a", [2, 0]),
        ("A C", [0, 2]),
        (" b , d , e , f ", [1, 3, 4]),
        ("A, A, B", [0, 1]),
        ("A,,B", [0, 1]),
        ("A, C\n", [0, 2]),
        ("A, B.", [0, 1]),
        ("G", [6]),
        ("NONE", []),
        ("none.", []),
        ("None", []),
        ("DINOv2", []),
        ("H", []),
        ("A, H", []),
        ("A, B, C, H", []),
        ("", []),
        ("   ", []),
        ("The answer is A", []),
        ("A1", []),
        ("AB", []),
        ("A. C", []),
        ("A, None", []),
        ("A, B..", []),
        ("A; B", []),
    ],
)
def test_parse_routing_table(reply: str, expected: list[int]) -> None:
    assert parse_routing(reply, num_experts=7) == expected


def test_parse_routing_respects_pool_size_and_max() -> None:
    assert parse_routing("D", num_experts=3) == []
    assert parse_routing("C", num_experts=3) == [2]
    assert parse_routing("A, B, C", num_experts=7, max_experts=1) == [0]
    assert parse_routing("B, B, A", num_experts=7, max_experts=2) == [1, 0]


def test_parse_routing_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_experts"):
        parse_routing("A", num_experts=27)
    with pytest.raises(ValueError, match="max_experts"):
        parse_routing("A", num_experts=7, max_experts=0)


def test_format_routing_answer_round_trips() -> None:
    assert format_routing_answer([0, 2]) == "A, C"
    assert format_routing_answer([]) == "None"
    for indices in ([0], [6, 1], [3, 4, 5], []):
        assert parse_routing(format_routing_answer(indices), num_experts=7) == indices


def test_build_routing_prompt_layout() -> None:
    descriptions = [descs[0] for _, descs in POOL]
    prompt = build_routing_prompt("<image>\nWhat does the chart show?", descriptions)
    lines = prompt.split("\n")
    assert lines[0] == "<image>"
    assert prompt.count("<image>") == 1
    for letter, description in zip(LETTERS, descriptions, strict=False):
        assert f"{letter}. {description}" in lines
    assert "Question: What does the chart show?" in lines
    assert "up to 3" in prompt and "None" in prompt
    assert lines.index("A. " + descriptions[0]) < lines.index("Question: What does the chart show?")
    for name in NAMES:
        assert name not in prompt.lower()
    assert build_routing_prompt("What does the chart show?", descriptions) == prompt
    assert "up to 2" in build_routing_prompt("q?", descriptions, max_experts=2)


def test_build_routing_prompt_custom_image_token() -> None:
    prompt = build_routing_prompt("<img> count the cats", ["counts things"], image_token="<img>")
    assert prompt.startswith("<img>\n")
    assert prompt.count("<img>") == 1
    assert "Question: count the cats" in prompt


@pytest.mark.parametrize(
    ("question", "descriptions"),
    [("", ["x"]), ("  <image>  ", ["x"]), ("q?", []), ("q?", ["x"] * 27), ("q?", ["ok", "  "])],
)
def test_build_routing_prompt_rejects_bad_input(question: str, descriptions: list[str]) -> None:
    with pytest.raises(ValueError):
        build_routing_prompt(question, descriptions)


def test_mask_and_names() -> None:
    assert mask_from_indices([0, 2], 4) == [1, 0, 1, 0]
    assert mask_from_indices([], 3) == [0, 0, 0]
    with pytest.raises(ValueError, match="4"):
        mask_from_indices([4], 4)
    assert indices_from_names(["deplot", "vary"], NAMES) == [4, 1]
    with pytest.raises(ValueError, match="clip.*dinov2"):
        indices_from_names(["clip"], NAMES)


def test_routing_accuracy() -> None:
    assert routing_accuracy([[0, 2], [1], []], [[2, 0], [1, 3], []]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        routing_accuracy([[0]], [])


def _positive_slots(example: RoutingExample, positives: list[str]) -> list[int]:
    return [slot for slot, name in enumerate(example.pool) if name in positives]


def test_augment_is_deterministic_and_consistent() -> None:
    positives = ["vary", "deplot"]
    a = augment_routing_example("What is the total?", POOL, positives, random.Random(3))
    b = augment_routing_example("What is the total?", POOL, positives, random.Random(3))
    assert a == b
    assert isinstance(a, RoutingExample)
    lines = a.prompt.split("\n")
    descriptions = dict(POOL)
    for letter, name in zip(LETTERS, a.pool, strict=False):
        line = next(x for x in lines if x.startswith(f"{letter}. "))
        assert line[3:] in descriptions[name]
    assert not any(x.startswith(f"{LETTERS[len(a.pool)]}. ") for x in lines)
    for name in NAMES:
        assert name not in a.prompt.lower()


def test_augment_answer_points_at_positives_across_seeds() -> None:
    positives = ["codetr", "sam"]
    sizes: Counter[int] = Counter()
    orders = set()
    kept_all = 0
    n = 400
    for seed in range(n):
        ex = augment_routing_example("Where is the dog?", POOL, positives, random.Random(seed))
        slots = _positive_slots(ex, positives)
        assert parse_routing(ex.answer, num_experts=len(ex.pool)) == slots
        assert [ex.pool[i] for i in parse_routing(ex.answer, len(ex.pool))] == [
            p for p in ex.pool if p in positives
        ]
        assert len(set(ex.pool)) == len(ex.pool)
        sizes[len(ex.pool)] += 1
        orders.add(ex.pool)
        kept_all += len(slots) == len(positives)
    assert set(sizes) == set(range(2, len(POOL) + 1))
    assert 0.88 <= kept_all / n < 1.0
    assert len(orders) > n // 2


def test_augment_no_shuffle_keeps_pool_order_and_limits_answer() -> None:
    positives = ["dinov2", "vary", "codetr", "deplot"]
    for seed in range(50):
        ex = augment_routing_example(
            "q?", POOL, positives, random.Random(seed), shuffle=False, keep_positives_prob=1.0
        )
        assert list(ex.pool) == [n for n in NAMES if n in ex.pool]
        assert set(positives) <= set(ex.pool)
        assert ex.answer == "A, B, C"
    ex = augment_routing_example(
        "q?", POOL, [], random.Random(0), min_pool=7, keep_positives_prob=1.0
    )
    assert ex.answer == "None" and len(ex.pool) == 7


def test_augment_rejects_bad_input() -> None:
    rng = random.Random(0)
    with pytest.raises(ValueError, match="clip"):
        augment_routing_example("q?", POOL, ["clip"], rng)
    with pytest.raises(ValueError, match="min_pool"):
        augment_routing_example("q?", POOL, [], rng, min_pool=8)
    with pytest.raises(ValueError, match="descriptions"):
        augment_routing_example("q?", [("a", [])], [], rng, min_pool=1)
    too_many = [(f"e{i}", ["d"]) for i in range(27)]
    with pytest.raises(ValueError, match="pool size"):
        augment_routing_example("q?", too_many, [], rng)
