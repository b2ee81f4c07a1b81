"""The expert registry: one named entry per vision encoder.

An entry says how to build the encoder (from its real ``transformers`` class), what image it
takes, which layer it reads, its native output grid and channels, and how the routing prompt
describes it (strengths and weaknesses, never its name). Adding an expert = one entry here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Families with a builder in mova.experts.encoders.
FAMILIES = ("clip", "dinov2", "vitdet", "sam", "pix2struct")


@dataclass(frozen=True)
class ImageInput:
    """How an expert's input is made from the request image.

    ``kind`` is ``pixels`` (a normalised C x H x W tensor) or ``patches`` (Pix2Struct's
    flattened patches); ``resample`` is how the image reaches the expert's ``image_size``
    (from the preset's ``source_size`` when it has one).
    """

    kind: str = "pixels"
    resample: str = "bilinear"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


@dataclass(frozen=True)
class ExpertSize:
    """Architecture sizes of one preset; ``out_grid``/``out_channels`` are the native output."""

    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    out_channels: int
    out_grid: int
    feature_layer: int = -1
    compress_channels: int | None = None
    # The square size (bicubic) the image is resized to before the expert's own resample:
    # the released code feeds DINOv2 from the 672 base image, Co-DETR from the 1024 image.
    source_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExpertSpec:
    name: str
    family: str
    input: ImageInput
    presets: dict[str, ExpertSize]
    descriptions: tuple[str, ...]
    reference_weights: str
    good_at: str
    reference_description: str | None = None
    """The one-line description the released MoVA routing prompt gives this expert (authors'
    text, verbatim), used when ``routing.prompt`` is ``released``; None if it has none."""

    def size(self, preset: str) -> ExpertSize:
        if preset not in self.presets:
            raise ValueError(
                f"expert {self.name!r} has no preset {preset!r}; expected one of "
                f"{sorted(self.presets)}"
            )
        return self.presets[preset]


_REGISTRY: dict[str, ExpertSpec] = {}


def register(spec: ExpertSpec) -> ExpertSpec:
    """Add an expert; names are unique and the family must have a builder."""
    if spec.family not in FAMILIES:
        raise ValueError(f"expert {spec.name!r}: family {spec.family!r} not in {FAMILIES}")
    if spec.name in _REGISTRY:
        raise ValueError(f"expert {spec.name!r} is already registered")
    if len(spec.descriptions) < 3:
        raise ValueError(f"expert {spec.name!r} needs at least 3 routing descriptions")
    for text in spec.descriptions:
        if spec.name.lower() in text.lower():
            raise ValueError(f"expert {spec.name!r}: a routing description names the model")
    if spec.reference_description is not None and (
            not spec.reference_description or "\n" in spec.reference_description):
        raise ValueError(f"expert {spec.name!r}: reference_description must be one line")
    _REGISTRY[spec.name] = spec
    return spec


def get_expert_spec(name: str) -> ExpertSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown expert {name!r}; registered experts: {expert_names()}")
    return _REGISTRY[name]


def expert_names() -> list[str]:
    return list(_REGISTRY)


@dataclass(frozen=True)
class ResolvedExpert:
    """An expert's spec with its preset sizes and the user's overrides applied."""

    spec: ExpertSpec
    size: ExpertSize
    pretrained: str | None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def channels(self) -> int:
        """Width of the features the expert emits (after optional compression)."""
        return self.size.compress_channels or self.size.out_channels


def resolve_expert(config: Any) -> ResolvedExpert:
    """Merge an :class:`mova.config.ExpertConfig` with its registry preset."""
    spec = get_expert_spec(config.name)
    size = spec.size(config.preset)
    overrides = {
        k: getattr(config, k)
        for k in ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads",
                  "out_channels", "feature_layer", "compress_channels")
        if getattr(config, k) is not None
    }
    if overrides:
        size = dataclasses.replace(size, **overrides)
        if spec.family in ("clip", "dinov2", "pix2struct") and (
            "image_size" in overrides or "patch_size" in overrides
        ):
            size = dataclasses.replace(size, out_grid=size.image_size // size.patch_size)
        if spec.family == "sam" and ("image_size" in overrides or "patch_size" in overrides):
            grid = size.image_size // size.patch_size
            size = dataclasses.replace(
                size, out_grid=(grid + 1) // 2 if size.compress_channels else grid)
        if spec.family == "pix2struct" and "hidden_size" in overrides:
            size = dataclasses.replace(size, out_channels=size.hidden_size)
        if spec.family in ("clip", "dinov2") and "hidden_size" in overrides:
            size = dataclasses.replace(size, out_channels=size.hidden_size)
    return ResolvedExpert(spec=spec, size=size, pretrained=config.pretrained)


# ---- the default pool, in the released code's order ------------------------------------------
DEFAULT_POOL = ("dinov2", "vary", "codetr", "pix2struct", "deplot", "biomedclip", "sam")

register(ExpertSpec(
    name="dinov2",
    family="dinov2",
    input=ImageInput(resample="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD),
    presets={
        "full": ExpertSize(518, 14, 1536, 40, 24, 1536, 37, feature_layer=-2, source_size=672,
                           extra={"mlp_ratio": 4, "use_swiglu_ffn": True}),
        "tiny": ExpertSize(56, 7, 24, 2, 2, 24, 8, feature_layer=-2, source_size=112),
    },
    descriptions=(
        "strong general visual features for natural images: objects, scenes, spatial layout and "
        "fine semantic detail; weak at reading text.",
        "a self-supervised backbone that describes photographs well (what is where, shapes, "
        "colours, parts of objects); it cannot read documents or charts.",
        "good at natural-scene understanding and the relations between things in an image; poor "
        "at small printed text.",
    ),
    reference_weights="facebook/dinov2-giant",
    good_at="natural images, spatial and semantic detail",
    # The released routing prompt's line for this expert (authors' text, verbatim).
    reference_description=(
        "This model can effectively extract the accurate spatial and semantic information "
        "from natural images."
    ),
))

register(ExpertSpec(
    name="vary",
    family="sam",
    input=ImageInput(resample="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD),
    presets={
        "full": ExpertSize(1024, 16, 768, 12, 12, 256, 32, compress_channels=512,
                           extra={"global_attn_indexes": [2, 5, 8, 11], "window_size": 14}),
        "tiny": ExpertSize(64, 8, 24, 2, 2, 16, 4, compress_channels=24,
                           extra={"global_attn_indexes": [1], "window_size": 4}),
    },
    descriptions=(
        "reads dense text such as documents, receipts, forms and printed pages (OCR); poor on "
        "natural images without text.",
        "an encoder trained for fine-grained document parsing and text recognition at high "
        "resolution; not helpful for photos of everyday scenes.",
        "good at recognising many lines of small text and document structure; weak at objects "
        "and scenes.",
    ),
    reference_weights="Vary-base (SAM-B image encoder + stride-2 conv)",
    good_at="dense text, OCR",
    # The released routing prompt's line for this expert (authors' text, verbatim).
    reference_description=(
        "This model can handle images with text accurately and efficiently but fails to "
        "process natural images."
    ),
))

register(ExpertSpec(
    name="codetr",
    family="vitdet",
    input=ImageInput(resample="nearest", mean=IMAGENET_MEAN, std=IMAGENET_STD),
    presets={
        "full": ExpertSize(1280, 16, 1024, 24, 16, 256, 37, source_size=1024,
                           extra={"window_size": 16, "window_block_indices": [
                               0, 1, 3, 4, 6, 7, 9, 10, 12, 13, 15, 16, 18, 19, 21, 22]}),
        "tiny": ExpertSize(64, 8, 24, 2, 2, 16, 8, source_size=48,
                           extra={"window_size": 4, "window_block_indices": [0]}),
    },
    descriptions=(
        "an object detector: finds, localises and counts objects of many categories; does not "
        "read text.",
        "good at how many objects there are and where each one is (bounding boxes); weak on "
        "documents and charts.",
        "detects people, animals, vehicles and everyday things, useful for counting and object "
        "positions; not for text-heavy images.",
    ),
    reference_weights="Co-DETR ViT-L (ViTDet backbone + simple feature pyramid neck)",
    good_at="objects, detection, counting",
    # The released routing prompt's line for this expert (authors' text, verbatim).
    reference_description=(
        "This model is a state-of-the-art object detector that can identify objects in "
        "images."
    ),
))

register(ExpertSpec(
    name="pix2struct",
    family="pix2struct",
    input=ImageInput(kind="patches"),
    presets={
        "full": ExpertSize(720, 16, 1536, 18, 24, 1536, 45),
        "tiny": ExpertSize(32, 4, 24, 2, 2, 24, 8),
    },
    descriptions=(
        "understands screenshots, user interfaces, documents and infographics with their text; "
        "weak on natural photographs.",
        "parses visually-situated text: web pages, forms, tables and charts rendered as images; "
        "not for scenes or objects.",
        "good at the layout and text of documents and interfaces; poor at medical images and "
        "photos.",
    ),
    reference_weights="google/pix2struct-large",
    good_at="text in documents, UIs, charts",
    # The released routing prompt's line for this expert (authors' text, verbatim).
    reference_description=(
        "This model shows remarkable skill in text recognition, attaining top-tier text "
        "analysis outcomes across diverse areas"
    ),
))

register(ExpertSpec(
    name="deplot",
    family="pix2struct",
    input=ImageInput(kind="patches"),
    presets={
        "full": ExpertSize(720, 16, 768, 12, 12, 768, 45),
        "tiny": ExpertSize(32, 4, 16, 2, 2, 16, 8),
    },
    descriptions=(
        "reads plots and charts: bar values, line trends, axis labels and legends; not useful "
        "for natural images.",
        "translates a chart into its underlying data table, good at numbers in figures; weak at "
        "objects and people.",
        "good at chart question answering (which bar is highest, what value a point has); poor "
        "at dense document text.",
    ),
    reference_weights="google/deplot",
    good_at="plots and charts",
    # The released routing prompt's line for this expert (authors' text, verbatim).
    reference_description=(
        "This model is a specialized model designed to achieve state-of-the-art plot and "
        "chart understanding performance."
    ),
))

register(ExpertSpec(
    name="biomedclip",
    family="clip",
    input=ImageInput(resample="bilinear"),
    presets={
        "full": ExpertSize(224, 16, 768, 12, 12, 768, 14, source_size=672),
        "tiny": ExpertSize(56, 7, 16, 2, 2, 16, 8, source_size=112),
    },
    descriptions=(
        "understands biomedical images: radiology scans, CT, MRI, X-rays, microscopy and "
        "pathology; weak on everyday photos and text.",
        "trained on figures from biomedical papers, good at recognising organs, lesions and "
        "abnormalities; not for charts or documents.",
        "a medical-domain vision encoder for questions about scans and clinical images; poor at "
        "general scenes.",
    ),
    reference_weights="microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
    good_at="radiology, biomedical images",
    # The released routing prompt's line for this expert (authors' text, verbatim).
    reference_description=(
        "This model is a foundation model designed for biomedical vision-language processing."
    ),
))

register(ExpertSpec(
    name="sam",
    family="sam",
    input=ImageInput(resample="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD),
    presets={
        "full": ExpertSize(1024, 16, 1280, 32, 16, 256, 64,
                           extra={"global_attn_indexes": [7, 15, 23, 31], "window_size": 14}),
        "tiny": ExpertSize(64, 8, 24, 2, 2, 16, 8,
                           extra={"global_attn_indexes": [1], "window_size": 4}),
    },
    descriptions=(
        "segments images into precise regions and boundaries, good at exact locations and "
        "shapes of things; does not recognise text or categories well.",
        "gives pixel-accurate masks of objects and parts, useful for where exactly something "
        "is; weak on reading.",
        "good at fine localisation, outlines and region grounding; poor at document and chart "
        "understanding.",
    ),
    reference_weights="facebook/sam-vit-huge",
    good_at="segmentation, precise locations",
    # The released routing prompt's line for this expert (authors' text, verbatim).
    reference_description=(
        "This model is a leading image segmentation framework and achieves strong zero-shot "
        "segmentation performance."
    ),
))
