"""The synthetic multi-domain data set: documents, charts, scenes and scans, drawn on CPU.

Each domain has a generator that draws an image from random parameters and writes the question
and answer from those same parameters (kept in ``meta``), so every answer can be re-checked with
:func:`answer_from_meta`. Generation is deterministic by seed: each (split, domain) pair has its
own random stream, so train and test never share a stream, and an image whose pixels repeat an
earlier one is redrawn. Routing-instruction samples (``kind="routing"``) built from train
questions go into the train manifest only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from mova.experts.registry import DEFAULT_POOL, get_expert_spec
from mova.routing import augment_routing_example
from pipelines.common.manifests.schema import Sample
from pipelines.data.synth_domains import DOMAINS, GENERATORS, MIN_IMAGE_SIZE

logger = logging.getLogger(__name__)

MAX_TRIES = 100


@dataclass
class SynthRecipe:
    """`mova data synth`: where to write, how many samples per domain and split, the seed."""

    out: str = ""
    seed: int = 0
    per_domain: int = 50
    test_per_domain: int = 20
    image_size: int = 128
    routing_samples: int = 50
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))

    def validate(self) -> SynthRecipe:
        """Raise ``ValueError`` naming the first bad field."""
        if not self.out:
            raise ValueError("synth recipe: out must be set (the output folder)")
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
        return self


@dataclass
class SynthResult:
    train_manifest: Path
    test_manifest: Path
    counts: dict[str, int]
    seconds: float
    domains: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "train_manifest": str(self.train_manifest),
                "test_manifest": str(self.test_manifest)}

    def format(self) -> str:
        lines = [f"{'domain':<12} {'train':>6} {'test':>6}"]
        for domain in self.domains:
            lines.append(f"{domain:<12} {self.counts[f'train/{domain}']:>6} "
                         f"{self.counts[f'test/{domain}']:>6}")
        lines += [f"{'routing':<12} {self.counts['train/routing']:>6} {0:>6}",
                  f"{'total':<12} {self.counts['train']:>6} {self.counts['test']:>6}",
                  f"generated in {self.seconds:.1f} s",
                  f"train manifest: {self.train_manifest}",
                  f"test manifest:  {self.test_manifest}"]
        return "\n".join(lines)


def _balanced(n: int, rng: random.Random) -> list[bool]:
    """``n`` yes/no targets, half of each (yes gets the odd one), shuffled."""
    targets = [i % 2 == 0 for i in range(n)]
    rng.shuffle(targets)
    return targets


def _pixels_key(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _domain_split(config: SynthRecipe, domain: str, split: str, count: int, out: Path,
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


def _routing_samples(config: SynthRecipe, train: dict[str, list[Sample]]) -> list[Sample]:
    """Routing-instruction records over the default pool, from random train questions."""
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


def generate(config: SynthRecipe, *, progress: bool = False) -> SynthResult:
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
    return SynthResult(train_path, test_path, counts, seconds, list(config.domains))
