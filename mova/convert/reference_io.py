"""Reading and writing the weight files of a released (LLaVA-style) checkpoint folder.

Accepted layouts, first match wins: ``model.safetensors.index.json`` (sharded safetensors),
``model.safetensors``, ``pytorch_model.bin.index.json`` (sharded ``.bin``),
``pytorch_model.bin``. A ``.bin`` file is read only with ``torch.load(weights_only=True)``:
tensors and plain containers load, any other pickled object is refused, never unpickled.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mova.convert import ReferenceImportError
from mova.convert.reference_keys import names

log = logging.getLogger(__name__)

LAYOUTS = (("model.safetensors.index.json", "safetensors"), ("model.safetensors", "safetensors"),
           ("pytorch_model.bin.index.json", "bin"), ("pytorch_model.bin", "bin"))
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3
_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U8": 1, "I8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class WeightFiles:
    """The tensors of a checkpoint folder, by key; each file is read when first needed."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._bin_cache: dict[Path, dict[str, Tensor]] = {}
        for name, kind in LAYOUTS:
            if (self.folder / name).is_file():
                self.kind, self.entry = kind, name
                break
        else:
            raise ReferenceImportError(
                f"{self.folder}: no weights found; expected one of {[n for n, _ in LAYOUTS]}")
        if self.entry.endswith(".index.json"):
            index = json.loads((self.folder / self.entry).read_text())
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ReferenceImportError(f"{self.folder / self.entry}: no 'weight_map'")
            self.key_file = {k: self.folder / v for k, v in weight_map.items()}
        else:
            path = self.folder / self.entry
            self.key_file = {k: path for k in self._file_keys(path)}
        absent = sorted({str(p.name) for p in self.key_file.values() if not p.is_file()})
        if absent:
            raise ReferenceImportError(f"{self.folder}: the index names missing shard(s) {absent}")

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.key_file.values()))

    def keys(self) -> list[str]:
        return sorted(self.key_file)

    def _file_keys(self, path: Path) -> list[str]:
        if self.kind == "safetensors":
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        return list(self._load_bin(path))

    def _load_bin(self, path: Path) -> dict[str, Tensor]:
        if path in self._bin_cache:
            return self._bin_cache[path]
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # a legacy (non-zip) file cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ReferenceImportError(
                f"{path}: refused to load: it holds something other than tensors, which is "
                f"never unpickled (torch.load weights_only=True said: {first})") from exc
        if not isinstance(state, Mapping):
            raise ReferenceImportError(f"{path}: expected a state dict (a mapping of names to "
                                       f"tensors), got {type(state).__name__}")
        bad = sorted(str(k) for k, v in state.items()
                     if not isinstance(k, str) or not isinstance(v, Tensor))
        if bad:
            raise ReferenceImportError(f"{path}: entries that are not tensors: {bad[:12]}")
        self._bin_cache[path] = dict(state)
        return self._bin_cache[path]

    def nbytes(self, key: str) -> int:
        """Stored size of one tensor, without reading safetensors data."""
        path = self.key_file[key]
        if self.kind == "bin":
            return self._load_bin(path)[key].nbytes
        with safe_open(str(path), framework="pt") as f:
            part = f.get_slice(key)
            count = 1
            for dim in part.get_shape():
                count *= dim
            return count * _DTYPE_BYTES.get(part.get_dtype(), 4)

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, without reading safetensors data."""
        path = self.key_file[key]
        if self.kind == "bin":
            return tuple(self._load_bin(path)[key].shape)
        with safe_open(str(path), framework="pt") as f:
            return tuple(f.get_slice(key).get_shape())

    def by_file(self, keys: Iterable[str]) -> Iterator[dict[str, Tensor]]:
        """The tensors of ``keys``, one file at a time (peak memory: one file's share)."""
        groups: dict[Path, list[str]] = {}
        for key in keys:
            groups.setdefault(self.key_file[key], []).append(key)
        for path, part in groups.items():
            if self.kind == "safetensors":
                with safe_open(str(path), framework="pt") as f:
                    yield {k: f.get_tensor(k) for k in part}
            else:
                state = self._load_bin(path)
                yield {k: state[k] for k in part}

    def load(self, keys: Iterable[str]) -> dict[str, Tensor]:
        """The tensors of ``keys`` (on CPU, in their stored dtype)."""
        out: dict[str, Tensor] = {}
        for chunk in self.by_file(keys):
            out.update(chunk)
        return out

    def release(self) -> None:
        """Drop the cached ``.bin`` contents."""
        self._bin_cache.clear()


def load_mapped(module: torch.nn.Module, weights: WeightFiles, mapping: Mapping[str, str],
                what: str, optional: Iterable[str] = ()) -> None:
    """Copy the checkpoint tensors ``mapping`` names (source key -> the module's key) into
    ``module``, file by file, after checking that every key exists, every shape matches and
    every tensor of the module is filled (only ``optional`` ones, e.g. a tied
    ``lm_head.weight``, may stay as they are)."""
    target = module.state_dict()
    unknown = sorted(k for k, v in mapping.items() if v not in target)
    if unknown:
        raise ReferenceImportError(f"{what}: {len(unknown)} checkpoint key(s) match no tensor "
                                   f"of the model: {names(unknown)}")
    missing = sorted(set(target) - set(mapping.values()) - set(optional))
    if missing:
        raise ReferenceImportError(f"{what}: the checkpoint lacks {len(missing)} tensor(s) the "
                                   f"model needs: {names(missing)}")
    bad = []
    for src, dst in mapping.items():
        shape = weights.shape(src)
        if shape != tuple(target[dst].shape):
            bad.append(f"{src} {shape} -> {dst} {tuple(target[dst].shape)}")
    if bad:
        raise ReferenceImportError(f"{what}: shape mismatch for {len(bad)} tensor(s): "
                                   f"{names(bad)}")
    with torch.no_grad():
        for chunk in weights.by_file(mapping):
            for src, tensor in chunk.items():
                target[mapping[src]].copy_(tensor)


def write_safetensors(weights: WeightFiles, out: str | Path,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the checkpoint's state dict, unchanged, as safetensors shards with
    ``model.safetensors.index.json``; the folder's other files (config, tokenizer) are copied,
    so ``out`` is the same released-layout checkpoint without pickle files."""
    out = Path(out)
    if out.resolve() == weights.folder.resolve():
        raise ReferenceImportError(f"write_safetensors: {out} is the source folder itself")
    out.mkdir(parents=True, exist_ok=True)
    for item in weights.folder.iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, out / item.name)
    shards: list[list[str]] = [[]]
    size = 0
    for key in weights.keys():
        nbytes = weights.nbytes(key)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    total = len(shards)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for i, keys in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{total:05d}.safetensors"
        tensors: dict[str, Tensor] = {}
        seen: set[int] = set()
        for key, tensor in weights.load(keys).items():
            tensor = tensor.contiguous()
            if tensor.data_ptr() in seen and tensor.numel():
                tensor = tensor.clone()  # safetensors refuses tensors sharing memory
            seen.add(tensor.data_ptr())
            tensors[key] = tensor
            total_bytes += tensor.nbytes
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    log.info("wrote %d tensors as %d safetensors shard(s) to %s", len(weight_map), total, out)
    return out
