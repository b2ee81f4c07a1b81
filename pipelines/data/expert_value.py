"""The expert-value data set: questions the base encoder answers, and questions only an expert can.

Each image is a large shape in one of six colours on a light background, with a small square
tag near its top-right corner filled with one of four fine patterns: ``horizontal`` or
``vertical`` 1-pixel lines, a ``checked`` 1-pixel board, or ``plain`` grey of the same mean
brightness. Two kinds of question, one per image:

- **base**: "What colour is the large shape?" The base encoder, even a random one at a low
  resolution, sees the colour of half the picture; the ground-truth routing is no expert.
- **detail**: "Which pattern fills the small tag?" The patterns' lines are one pixel apart in
  the full image: once it is resized for the base encoder (28 px in the experiment, an eighth)
  every pattern is the same grey, so the information is gone before the base sees it, while
  DINOv2 at 224 px takes the pixels as they are. The tag moves by up to ``jitter_px`` so that
  no aliasing of one position can tell the patterns apart. The ground-truth routing is
  ``dinov2``. (A first version asked for a letter, ``b``/``d``/``p``/``q``, on the tag: a
  linear probe read it from a random base's corner features 72% of the time, because the
  letters' ink sits in different quarters of the tag, which survives 1.5 px.)

The answer is drawn from the same parameters as the image (kept in ``meta``), every (split,
kind) pair has its own random stream, and the two kinds are balanced in each split.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipelines.common.manifests.schema import Sample

COLOURS = {"red": (214, 40, 40), "green": (40, 160, 64), "blue": (40, 72, 214),
           "yellow": (228, 196, 28), "purple": (136, 48, 168), "orange": (236, 128, 28)}
SHAPES = ("circle", "square", "triangle")
PATTERNS = ("horizontal", "vertical", "checked", "plain")  # one mean brightness: only fine
# detail tells them apart
KINDS = ("base", "detail")
DETAIL_EXPERT = "dinov2"
TRUTH = {"base": [], "detail": [DETAIL_EXPERT]}  # the ground-truth routing per kind
QUESTIONS = {
    "base": ("What colour is the large shape? Answer with one word.",
             "Which colour does the big shape have? Answer with one word."),
    "detail": ("Which pattern fills the small tag in the top-right corner? Answer with one "
               "word: horizontal, vertical, checked or plain.",
               "What pattern does the little corner tag show? Answer with one word: "
               "horizontal, vertical, checked or plain."),
}
BACKGROUND = (236, 236, 236)


@dataclass
class ExpertValueData:
    """How much to draw: ``per_kind`` answer rows per kind and split, images ``image_size``
    square with a tag ``tag_px`` on a side that moves by up to ``jitter_px``."""

    out: str
    seed: int = 0
    train_per_kind: int = 200
    test_per_kind: int = 100
    image_size: int = 224
    tag_px: int = 18
    jitter_px: int = 6

    def validate(self) -> ExpertValueData:
        if not self.out:
            raise ValueError("expert-value data: out must be set (the output folder)")
        if self.train_per_kind < 1 or self.test_per_kind < 1:
            raise ValueError("expert-value data: train_per_kind and test_per_kind must be >= 1")
        if not 8 <= self.tag_px <= self.image_size // 8:
            raise ValueError(f"expert-value data: tag_px={self.tag_px} must be in "
                             f"[8, image_size / 8]")
        if not 0 <= self.jitter_px <= self.image_size // 8:
            raise ValueError(f"expert-value data: jitter_px={self.jitter_px} must be in "
                             f"[0, image_size / 8]")
        return self


def pattern_tile(pattern: str, side: int) -> Image.Image:
    """A ``side`` square of ``pattern``: 1-pixel lines or checks of black and white, or the
    grey of their mean."""
    y, x = np.mgrid[:side, :side]
    if pattern == "horizontal":
        ink = y % 2 == 0
    elif pattern == "vertical":
        ink = x % 2 == 0
    elif pattern == "checked":
        ink = (x + y) % 2 == 0
    elif pattern == "plain":
        return Image.new("RGB", (side, side), (128, 128, 128))
    else:
        raise ValueError(f"pattern={pattern!r}; expected one of {PATTERNS}")
    return Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)).convert("RGB")


def draw(rng: random.Random, size: int, tag_px: int,
         jitter_px: int = 6) -> tuple[Image.Image, dict[str, Any]]:
    """One image and the parameters it was drawn from (colour, shape, pattern, tag box)."""
    colour, shape, pattern = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(PATTERNS)
    image = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    radius = rng.randint(size // 5, size // 3)
    # the shape stays clear of the tag's corner
    cx = rng.randint(radius + 2, size - radius - 2)
    cy = rng.randint(max(radius + 2, tag_px + jitter_px + 14 + radius // 2), size - radius - 2)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
                    fill=fill)
    left = size - tag_px - 6 - rng.randint(0, jitter_px)
    top = 6 + rng.randint(0, jitter_px)
    image.paste(pattern_tile(pattern, tag_px), (left, top))
    return image, {"colour": colour, "shape": shape, "pattern": pattern,
                   "tag": [left, top, tag_px]}


def _rows(recipe: ExpertValueData, split: str, kind: str, count: int,
          out: Path) -> list[Sample]:
    rng = random.Random(f"mova-expert-value:{recipe.seed}:{split}:{kind}")
    folder = out / "images" / kind
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        image, meta = draw(rng, recipe.image_size, recipe.tag_px, recipe.jitter_px)
        question = rng.choice(QUESTIONS[kind])
        answer = meta["colour"] if kind == "base" else meta["pattern"]
        sample_id = f"{split}-{kind}-{i:05d}"
        image.save(folder / f"{sample_id}.png", format="PNG")
        rows.append(Sample(
            id=sample_id, image=f"images/{kind}/{sample_id}.png",
            conversations=[{"from": "human", "value": "<image>\n" + question},
                           {"from": "gpt", "value": answer}],
            experts=list(TRUTH[kind]), kind="answer", domain=f"expert-value-{kind}",
            answers=[answer], metric="exact_match",
            meta={**meta, "question": question, "question_kind": kind,
                  "truth": list(TRUTH[kind])}))
    return rows


def generate(recipe: ExpertValueData) -> dict[str, str]:
    """Draw both splits; returns the paths of ``train.jsonl`` and ``test.jsonl`` (rows labelled
    with their ground-truth experts, the kinds interleaved)."""
    recipe.validate()
    out = Path(recipe.out)
    paths = {}
    for split, count in (("train", recipe.train_per_kind), ("test", recipe.test_per_kind)):
        kinds = [_rows(recipe, split, kind, count, out) for kind in KINDS]
        rows = [row for pair in zip(*kinds, strict=True) for row in pair]
        path = out / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row.to_dict()) + "\n")
        tmp.replace(path)
        paths[split] = str(path)
    return paths
