"""The four synthetic domains: how each draws an image and asks about it, and how an answer
is re-derived from the drawing's parameters (:func:`answer_from_meta`)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, NamedTuple

from PIL import Image

from pipelines.data import render

DOMAINS = ("documents", "charts", "scenes", "biomedical")
LABELS: dict[str, list[str]] = {
    "documents": ["vary", "pix2struct"],
    "charts": ["deplot", "pix2struct"],
    "scenes": ["dinov2", "codetr"],
    "biomedical": ["biomedclip"],
}
MIN_IMAGE_SIZE = 64

TITLES = ("Invoice", "Report", "Receipt", "Memo", "Notice", "Summary", "Budget", "Order")
FIELD_LABELS = ("total", "tax", "items", "price", "count", "weight", "page", "score")
BAR_LETTERS = "ABCD"
BAR_COLOURS = ((31, 90, 200), (214, 100, 30), (60, 140, 60), (120, 70, 170))
BACKGROUNDS = ((245, 245, 245), (250, 244, 230), (235, 242, 250), (240, 248, 238))

QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "documents": {
        "title": ("What is the title of this document?", "What word is written at the top?"),
        "value": ("What is the value of {label}?", "What number is written next to {label}?"),
    },
    "charts": {
        "highest": ("Which bar is the highest?", "Which bar has the largest value?"),
        "lowest": ("Which bar is the lowest?", "Which bar has the smallest value?"),
        "value": ("What is the value of bar {bar}?", "How high is bar {bar}?"),
    },
    "scenes": {
        "count": ("How many {colour} {shape}s are there?",
                  "How many {colour} {shape}s can you see?"),
        "colour": ("What colour is the {shape}?", "What is the colour of the {shape}?"),
        "exists": ("Is there a {colour} {shape}?", "Is there a {colour} {shape} in the image?"),
    },
    "biomedical": {
        "lesion": ("Is there a lesion in this scan?", "Does this scan show a lesion?"),
        "normal": ("Is this scan normal?", "Does this scan look healthy?"),
    },
}
METRICS = {"documents": "anls", "charts": "relaxed_accuracy", "scenes": "vqa_accuracy",
           "biomedical": "exact_match"}


class Drawn(NamedTuple):
    """One generated example before it is saved: image, text, references and parameters."""

    image: Image.Image
    question: str
    answer: str
    answers: list[str]
    metric: str
    experts: list[str]
    meta: dict[str, Any]


def _ask(domain: str, rng: random.Random, kind: str, **fields: Any) -> tuple[str, dict]:
    """Pick a phrasing of ``kind``; returns the question and the meta keys that name it."""
    phrasings = QUESTIONS[domain][kind]
    index = rng.randrange(len(phrasings))
    return phrasings[index].format(**fields), {"template": kind, "phrasing": index}


def _finish(domain: str, image: Image.Image, question: str, meta: dict[str, Any]) -> Drawn:
    answer = answer_from_meta(domain, meta)
    return Drawn(image, question, answer, [answer], METRICS[domain], list(LABELS[domain]), meta)


def draw_document(rng: random.Random, size: int, yes: bool) -> Drawn:
    """A page with a title word and 2-4 ``label: number`` lines (numbers 0-99)."""
    del yes  # no yes/no questions here
    title = rng.choice(TITLES)
    labels = rng.sample(FIELD_LABELS, rng.randint(2, 4))
    fields = [(label, rng.randint(0, 99)) for label in labels]
    layout = {
        "margin": rng.randint(round(size * 0.06), round(size * 0.12)),
        "title_size": max(10, round(size * rng.uniform(0.12, 0.15))),
        "line_size": max(8, round(size * rng.uniform(0.085, 0.1))),
        "line_gap": max(2, round(size * 0.03)),
    }
    block = (layout["title_size"] + max(2, layout["line_gap"] // 2) + layout["line_gap"]
             + len(fields) * (layout["line_size"] + layout["line_gap"]))
    low = round(size * 0.04)
    layout["top"] = rng.randint(low, max(low, size - block - low))
    image = render.document_image(size, title, fields, **layout)
    kind = rng.choice(("title", "value"))
    ask = rng.choice(labels) if kind == "value" else None
    question, meta = _ask("documents", rng, kind, label=ask)
    meta.update(title=title, fields=[list(f) for f in fields], ask=ask, layout=layout)
    return _finish("documents", image, question, meta)


def draw_chart(rng: random.Random, size: int, yes: bool) -> Drawn:
    """Four bars A-D with values 1-9 (a unique highest and lowest), values written on top."""
    del yes
    while True:
        values = [rng.randint(1, 9) for _ in BAR_LETTERS]
        if values.count(max(values)) == 1 and values.count(min(values)) == 1:
            break
    colour = rng.choice(BAR_COLOURS)
    image = render.bar_chart_image(size, values, list(BAR_LETTERS), colour=colour)
    kind = rng.choice(("highest", "lowest", "value"))
    bar = rng.choice(BAR_LETTERS) if kind == "value" else None
    question, meta = _ask("charts", rng, kind, bar=bar)
    meta.update(values=values, labels=list(BAR_LETTERS), bar=bar, colour=list(colour))
    return _finish("charts", image, question, meta)


def _place_shapes(rng: random.Random, size: int, items: list[tuple[str, str]]) -> list[dict]:
    """Put each (colour, shape) in its own cell of a 3 x 3 grid, with jitter; no overlaps."""
    cell = size / 3
    cells = rng.sample(range(9), len(items))
    placed = []
    for (colour, shape), index in zip(items, cells, strict=True):
        r = round(cell * rng.uniform(0.2, 0.32), 2)
        slack = cell / 2 - r - 1
        x = round((index % 3 + 0.5) * cell + rng.uniform(-slack, slack), 2)
        y = round((index // 3 + 0.5) * cell + rng.uniform(-slack, slack), 2)
        placed.append({"shape": shape, "colour": colour, "x": x, "y": y, "r": r})
    return placed


def draw_scene(rng: random.Random, size: int, yes: bool) -> Drawn:
    """Coloured circles, squares and triangles; count, colour or yes/no existence questions."""
    colours = list(render.COLOURS)
    combos = [(c, s) for c in colours for s in render.SHAPES]
    colour, shape = rng.choice(combos)
    others = [combo for combo in combos if combo != (colour, shape)]
    kind = rng.choice(("count", "colour", "exists"))
    if kind == "count":
        items = [(colour, shape)] * rng.randint(1, 4)
        items += [rng.choice(others) for _ in range(rng.randint(0, 3))]
    elif kind == "colour":
        other_shapes = [combo for combo in combos if combo[1] != shape]
        items = [(colour, shape)] + [rng.choice(other_shapes) for _ in range(rng.randint(0, 4))]
    else:
        items = [(colour, shape)] if yes else [rng.choice(others)]
        items += [rng.choice(others) for _ in range(rng.randint(0, 4))]
    rng.shuffle(items)
    shapes = _place_shapes(rng, size, items)
    background = rng.choice(BACKGROUNDS)
    image = render.scene_image(size, shapes, background)
    question, meta = _ask("scenes", rng, kind, colour=colour, shape=shape)
    meta.update(colour=colour, shape=shape, shapes=shapes, background=list(background))
    return _finish("scenes", image, question, meta)


def draw_scan(rng: random.Random, size: int, yes: bool) -> Drawn:
    """A grayscale textured body; a bright round lesion exactly when the question needs one."""
    kind = rng.choice(("lesion", "normal"))
    has_lesion = yes if kind == "lesion" else not yes
    body = {
        "cx": round(size * rng.uniform(0.45, 0.55), 2),
        "cy": round(size * rng.uniform(0.45, 0.55), 2),
        "rx": round(size * rng.uniform(0.3, 0.42), 2),
        "ry": round(size * rng.uniform(0.3, 0.42), 2),
        "level": rng.randint(80, 130),
    }
    lesion = None
    if has_lesion:
        angle, reach = rng.uniform(0.0, 2 * math.pi), rng.uniform(0.0, 0.5)
        lesion = {
            "x": round(body["cx"] + reach * body["rx"] * math.cos(angle), 2),
            "y": round(body["cy"] + reach * body["ry"] * math.sin(angle), 2),
            "r": round(size * rng.uniform(0.05, 0.09), 2),
            "level": rng.randint(215, 250),
        }
    noise_seed = rng.getrandbits(32)
    image = render.scan_image(size, body, lesion, noise_seed=noise_seed)
    question, meta = _ask("biomedical", rng, kind)
    meta.update(body=body, lesion=lesion, noise_seed=noise_seed)
    return _finish("biomedical", image, question, meta)


GENERATORS: dict[str, Callable[[random.Random, int, bool], Drawn]] = {
    "documents": draw_document,
    "charts": draw_chart,
    "scenes": draw_scene,
    "biomedical": draw_scan,
}


def answer_from_meta(domain: str, meta: dict[str, Any]) -> str:
    """The answer implied by a sample's drawing parameters (``meta``)."""
    kind = meta.get("template")
    if domain == "documents":
        if kind == "title":
            return meta["title"]
        if kind == "value":
            return str(dict(meta["fields"])[meta["ask"]])
    elif domain == "charts":
        values, labels = meta["values"], meta["labels"]
        if kind == "highest":
            return labels[values.index(max(values))]
        if kind == "lowest":
            return labels[values.index(min(values))]
        if kind == "value":
            return str(values[labels.index(meta["bar"])])
    elif domain == "scenes":
        matches = [s for s in meta["shapes"] if s["shape"] == meta["shape"]]
        if kind == "colour":
            return matches[0]["colour"]
        matches = [s for s in matches if s["colour"] == meta["colour"]]
        if kind == "count":
            return str(len(matches))
        if kind == "exists":
            return "yes" if matches else "no"
    elif domain == "biomedical":
        if kind in ("lesion", "normal"):
            return "yes" if (meta["lesion"] is not None) == (kind == "lesion") else "no"
    else:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    raise ValueError(f"domain {domain!r}: unknown question template {kind!r} in meta")
