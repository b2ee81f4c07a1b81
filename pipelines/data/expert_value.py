"""The expert-value data set: questions the base encoder answers, and questions only an expert can.

Each image is a large shape in one of six colours on a light background, with a small white tag
in its top-right corner that carries one of the letters ``b``, ``d``, ``p``, ``q``. Two kinds of
question, one per image:

- **base**: "What colour is the large shape?" The base encoder, even a random one at a low
  resolution, sees the colour of half the picture; the ground-truth routing is no expert.
- **detail**: "Which letter is on the small tag?" The tag's letter is ``tag_px`` pixels tall in
  the full image: a few pixels once the base encoder's input is resized (28 px in the
  experiment: 1.5 px), a patch's worth for DINOv2 at 224 px. The four letters have the same
  ink and differ only by their shape, so no brightness cue gives them away. The ground-truth
  routing is ``dinov2``.

The answer is drawn from the same parameters as the image (kept in ``meta``), every (split,
kind) pair has its own random stream, and the two kinds are balanced in each split.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from pipelines.common.manifests.schema import Sample

COLOURS = {"red": (214, 40, 40), "green": (40, 160, 64), "blue": (40, 72, 214),
           "yellow": (228, 196, 28), "purple": (136, 48, 168), "orange": (236, 128, 28)}
SHAPES = ("circle", "square", "triangle")
LETTERS = "bdpq"  # the same strokes, mirrored or turned: only their shape tells them apart
KINDS = ("base", "detail")
DETAIL_EXPERT = "dinov2"
TRUTH = {"base": [], "detail": [DETAIL_EXPERT]}  # the ground-truth routing per kind
QUESTIONS = {
    "base": ("What colour is the large shape? Answer with one word.",
             "Which colour does the big shape have? Answer with one word."),
    "detail": ("Which letter is printed on the small tag in the top-right corner? Answer with "
               "one letter.",
               "What letter does the little corner tag show? Answer with one letter."),
}
BACKGROUND = (236, 236, 236)


@dataclass
class ExpertValueData:
    """How much to draw: ``per_kind`` answer rows per kind and split, images ``image_size``
    square with the tag's letter ``tag_px`` tall."""

    out: str
    seed: int = 0
    train_per_kind: int = 200
    test_per_kind: int = 100
    image_size: int = 224
    tag_px: int = 12

    def validate(self) -> ExpertValueData:
        if not self.out:
            raise ValueError("expert-value data: out must be set (the output folder)")
        if self.train_per_kind < 1 or self.test_per_kind < 1:
            raise ValueError("expert-value data: train_per_kind and test_per_kind must be >= 1")
        if not 8 <= self.tag_px <= self.image_size // 8:
            raise ValueError(f"expert-value data: tag_px={self.tag_px} must be in "
                             f"[8, image_size / 8]")
        return self


def draw(rng: random.Random, size: int, tag_px: int) -> tuple[Image.Image, dict[str, Any]]:
    """One image and the parameters it was drawn from (colour, shape, letter)."""
    colour, shape, letter = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(LETTERS)
    image = Image.new("RGB", (size, size), BACKGROUND)
    pen = ImageDraw.Draw(image)
    tag = tag_px + tag_px // 2  # the tag's side
    radius = rng.randint(size // 5, size // 3)
    # the shape stays clear of the tag's corner
    cx = rng.randint(radius + 2, size - radius - 2)
    cy = rng.randint(max(radius + 2, tag + 8 + radius // 2), size - radius - 2)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
                    fill=fill)
    left, top = size - tag - 6, 6
    pen.rectangle((left, top, left + tag, top + tag), fill=(255, 255, 255), outline=(0, 0, 0))
    font = ImageFont.load_default(size=tag_px)
    pen.text((left + tag / 2, top + tag / 2), letter, fill=(0, 0, 0), font=font, anchor="mm")
    return image, {"colour": colour, "shape": shape, "letter": letter}


def _rows(recipe: ExpertValueData, split: str, kind: str, count: int,
          out: Path) -> list[Sample]:
    rng = random.Random(f"mova-expert-value:{recipe.seed}:{split}:{kind}")
    folder = out / "images" / kind
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        image, meta = draw(rng, recipe.image_size, recipe.tag_px)
        question = rng.choice(QUESTIONS[kind])
        answer = meta["colour"] if kind == "base" else meta["letter"]
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
