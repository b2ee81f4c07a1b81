"""The synthetic multi-domain data set: documents, charts, scenes and scans, drawn on CPU.

Each domain has a generator that draws an image from random parameters and writes the question
and answer from those same parameters (kept in ``meta``), so every answer can be re-checked with
:func:`answer_from_meta`. Generation is deterministic by seed: each (split, domain) pair has its
own random stream, so train and test never share a stream, and an image whose pixels repeat an
earlier one is redrawn. Routing-instruction samples (``kind="routing"``) built from train
questions go into the train manifest only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image
from tqdm import tqdm

from pipelines.data import render
from pipelines.data.schema import Sample

logger = logging.getLogger(__name__)

DOMAINS = ("documents", "charts", "scenes", "biomedical")
LABELS: dict[str, list[str]] = {
    "documents": ["vary", "pix2struct"],
    "charts": ["deplot", "pix2struct"],
    "scenes": ["dinov2", "codetr"],
    "biomedical": ["biomedclip"],
}
MIN_IMAGE_SIZE = 64
MAX_TRIES = 100

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


@dataclass
class SynthConfig:
    out: str
    seed: int = 0
    per_domain: int = 50
    test_per_domain: int = 20
    image_size: int = 128
    routing_samples: int = 50
    domains: tuple[str, ...] = DOMAINS

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        for name in ("per_domain", "test_per_domain", "routing_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {self.image_size}")
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains must be non-empty and distinct, got {self.domains}")
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown:
            raise ValueError(f"unknown domains {unknown}; expected some of {DOMAINS}")
        if self.routing_samples and not self.per_domain:
            raise ValueError("routing_samples > 0 needs train samples (per_domain > 0)")


@dataclass
class SynthResult:
    train_manifest: Path
    test_manifest: Path
    counts: dict[str, int]
    seconds: float


def _balanced(n: int, rng: random.Random) -> list[bool]:
    """``n`` yes/no targets, half of each (yes gets the odd one), shuffled."""
    targets = [i % 2 == 0 for i in range(n)]
    rng.shuffle(targets)
    return targets


def _pixels_key(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _domain_split(config: SynthConfig, domain: str, split: str, count: int, out: Path,
                  seen: set[str], step: Callable[[], Any]) -> list[Sample]:
    """Draw, save and describe ``count`` samples of one domain for one split."""
    rng = random.Random(f"mova-synth:{config.seed}:{split}:{domain}")
    folder = out / "images" / domain
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for i, yes in enumerate(_balanced(count, rng)):
        for _ in range(MAX_TRIES):
            drawn = GENERATORS[domain](rng, config.image_size, yes)
            key = _pixels_key(drawn.image)
            if key not in seen:
                break
        else:
            raise ValueError(f"{domain}: no new image after {MAX_TRIES} tries; lower the counts")
        seen.add(key)
        sample_id = f"{split}-{domain}-{i:05d}"
        drawn.image.save(folder / f"{sample_id}.png", format="PNG")
        samples.append(Sample(
            id=sample_id,
            image=f"images/{domain}/{sample_id}.png",
            conversations=[{"from": "human", "value": "<image>\n" + drawn.question},
                           {"from": "gpt", "value": drawn.answer}],
            experts=drawn.experts, kind="answer", domain=domain, answers=drawn.answers,
            metric=drawn.metric, meta={**drawn.meta, "question": drawn.question},
        ))
        step()
    return samples


def _routing_samples(config: SynthConfig, train: dict[str, list[Sample]]) -> list[Sample]:
    """Routing-instruction records over the default pool, from random train questions."""
    from mova.experts.registry import DEFAULT_POOL, get_expert_spec
    from mova.routing import augment_routing_example

    pool = [(name, get_expert_spec(name).descriptions) for name in DEFAULT_POOL]
    rng = random.Random(f"mova-synth:{config.seed}:routing")
    domains = [d for d in config.domains if train.get(d)]
    samples = []
    for i in range(config.routing_samples):
        domain = rng.choice(domains)
        source = rng.choice(train[domain])
        example = augment_routing_example(source.meta["question"], pool, source.experts, rng)
        samples.append(Sample(
            id=f"train-routing-{i:05d}", image=source.image,
            conversations=[{"from": "human", "value": example.prompt},
                           {"from": "gpt", "value": example.answer}],
            experts=list(source.experts), kind="routing", domain=domain,
            meta={"pool": list(example.pool), "source": source.id},
        ))
    return samples


def _write_jsonl(samples: Iterable[Sample], path: Path) -> Path:
    """Write one JSON record per line via a temp file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps(sample.to_dict()) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def generate(config: SynthConfig, *, progress: bool = False) -> SynthResult:
    """Generate the data set under ``config.out``; same config -> byte-identical files.

    ``counts`` has ``<split>/<domain>`` keys (plus ``train/routing``) and ``train``/``test``
    totals; ``synth.json`` records the config (less ``out``) and counts, not the time, so it is
    reproducible too.
    """
    config.validate()
    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    total = (config.per_domain + config.test_per_domain) * len(config.domains)
    splits: dict[str, dict[str, list[Sample]]] = {"train": {}, "test": {}}
    with tqdm(total=total, desc="synth", unit="img", file=sys.stderr,
              disable=not progress) as bar:
        for split, count in (("train", config.per_domain), ("test", config.test_per_domain)):
            for domain in config.domains:
                splits[split][domain] = _domain_split(
                    config, domain, split, count, out, seen, lambda: bar.update(1))
    routing = _routing_samples(config, splits["train"]) if config.routing_samples else []

    counts: dict[str, int] = {}
    for split, by_domain in splits.items():
        for domain, samples in by_domain.items():
            counts[f"{split}/{domain}"] = len(samples)
    counts["train/routing"] = len(routing)
    train = [s for d in config.domains for s in splits["train"][d]] + routing
    test = [s for d in config.domains for s in splits["test"][d]]
    counts["train"], counts["test"] = len(train), len(test)

    train_path = _write_jsonl(train, out / "train.jsonl")
    test_path = _write_jsonl(test, out / "test.jsonl")
    # The folder is left out: the record describes the data wherever the folder moves.
    settings = {k: v for k, v in asdict(config).items() if k != "out"}
    record = {"config": {**settings, "domains": list(config.domains)}, "counts": counts}
    (out / "synth.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    seconds = time.perf_counter() - start
    logger.info("synthetic data: %d train + %d test records in %.1f s under %s",
                len(train), len(test), seconds, out)
    return SynthResult(train_path, test_path, counts, seconds)


def _run(args: argparse.Namespace) -> int:
    domains = tuple(d.strip() for d in args.domains.split(",") if d.strip())
    config = SynthConfig(out=args.out, seed=args.seed, per_domain=args.per_domain,
                         test_per_domain=args.test_per_domain, image_size=args.image_size,
                         routing_samples=args.routing_samples, domains=domains)
    result = generate(config, progress=True)
    print(f"{'domain':<12} {'train':>6} {'test':>6}")
    for domain in config.domains:
        print(f"{domain:<12} {result.counts[f'train/{domain}']:>6} "
              f"{result.counts[f'test/{domain}']:>6}")
    print(f"{'routing':<12} {result.counts['train/routing']:>6} {0:>6}")
    print(f"{'total':<12} {result.counts['train']:>6} {result.counts['test']:>6}")
    print(f"generated in {result.seconds:.1f} s")
    print(f"train manifest: {result.train_manifest}")
    print(f"test manifest:  {result.test_manifest}")
    return 0


def add_synth_parser(data_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``synth`` to the ``mova data`` sub-commands."""
    parser = data_sub.add_parser(
        "synth", help="generate the synthetic multi-domain data set (CPU, seconds)",
        description="Draw documents, charts, shape scenes and scans with checkable answers, "
                    "plus routing-instruction samples; deterministic by seed.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-domain", type=int, default=50, help="train samples per domain")
    parser.add_argument("--test-per-domain", type=int, default=20,
                        help="test samples per domain")
    parser.add_argument("--image-size", type=int, default=128, help="square image side (px)")
    parser.add_argument("--routing-samples", type=int, default=50,
                        help="routing-instruction samples added to train")
    parser.add_argument("--domains", default=",".join(DOMAINS),
                        help=f"comma-separated subset of {','.join(DOMAINS)}")
    parser.set_defaults(func=_run)
    return parser
