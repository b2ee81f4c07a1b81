"""The manifest record: one LLaVA-style sample per line (JSONL) or row (Parquet).

``image`` is a path relative to the manifest's folder, an absolute path, or an ``s3://`` URI.
``experts`` is the routing label (expert names; the hard expert mask in training), or None when
unknown. ``kind`` is ``answer`` (a normal sample, the image becomes the adapter's full image
tokens) or ``routing`` (a routing-instruction sample: the prompt lists the expert pool and the
target is the letters; the image becomes the pooled routing tokens). ``answers`` and ``metric``
are optional references for evaluation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("answer", "routing")
FIELDS = ("id", "image", "conversations", "experts", "kind", "domain", "answers", "metric", "meta")


@dataclass
class Sample:
    id: str
    image: str | None
    conversations: list[dict[str, str]]
    experts: list[str] | None = None
    kind: str = "answer"
    domain: str | None = None
    answers: list[str] | None = None
    metric: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Sample:
        """Build from a validated row (see ``pipelines.common.manifests.validate.validate_row``)."""
        return cls(**{k: row[k] for k in FIELDS if k in row})
