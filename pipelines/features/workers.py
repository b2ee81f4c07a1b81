"""The Ray Data functions and actors of the feature job (see :mod:`pipelines.features.job`)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mova.checkpoint import load_expert
from mova.device import resolve_device, to_model_inputs
from mova.experts.preprocess import expert_input
from mova.images import ImageError, image_hash, load_image
from pipelines.common import storage
from pipelines.common.checkpoint_store import local_checkpoint
from pipelines.common.feature_cache import FeatureCache
from pipelines.common.manifests.scan import write_report_part
from pipelines.common.manifests.stream import samples_of
from pipelines.common.manifests.validate import resolve_image


def image_needs(batch: dict[str, np.ndarray], mode: str, wanted: list[str]
                ) -> dict[str, list]:
    """Manifest rows -> (image URI, the experts it needs): the row's routing label, or every
    wanted expert for ``mode="all"`` or an unlabelled row; rows without image or need drop."""
    uris, needs = [], []
    for file, _, sample in samples_of(batch):
        if not sample.image:
            continue
        experts = wanted if mode == "all" or sample.experts is None else \
            [e for e in wanted if e in sample.experts]
        if experts:
            uris.append(resolve_image(file, sample.image))
            needs.append(",".join(experts))
    return {"uri": uris, "experts": needs}


def union_needs(group: dict[str, np.ndarray], wanted: list[str]) -> dict[str, list]:
    """One row per image: the union of what its rows need, in pool order."""
    needs = {n for value in group["experts"] for n in str(value).split(",") if n}
    return {"uri": [str(group["uri"][0])],
            "experts": [",".join(n for n in wanted if n in needs)]}


def decode_images(batch: dict[str, np.ndarray], skip_bad: bool, report: str
                  ) -> dict[str, list]:
    """Read and decode each image once: its content hash and RGB pixels. An unreadable image
    fails the job naming it, or (``skip_bad``) is reported and passed on marked bad."""
    out: dict[str, list] = {"uri": [], "experts": [], "hash": [], "pixels": [], "width": [],
                            "height": [], "error": []}
    bad = []
    for uri, experts in zip(batch["uri"], batch["experts"], strict=True):
        uri = str(uri)
        try:
            image = load_image(storage.read_bytes(uri))
            row = (image_hash(image), image.tobytes(), image.width, image.height, "")
        except (ImageError, FileNotFoundError, OSError, ValueError) as exc:
            if not skip_bad:
                raise ValueError(f"image {uri} cannot be read: {exc} (use skip_bad_rows=true "
                                 "to skip and report such images)") from None
            bad.append({"image": uri, "error": str(exc)})
            row = ("", b"", 0, 0, str(exc))
        for key, value in zip(("hash", "pixels", "width", "height", "error"), row, strict=True):
            out[key].append(value)
        out["uri"].append(uri)
        out["experts"].append(str(experts))
    if bad:
        write_report_part(report, "images", bad)
    _trace_decodes(out["uri"])
    return out


def _trace_decodes(uris: list[str]) -> None:
    """With ``MOVA_TRACE_DECODES=<folder>`` set, record every decode (a debugging aid: the job
    should decode each image once, whatever the number of experts and rows that need it)."""
    folder = os.environ.get("MOVA_TRACE_DECODES")
    if folder:
        os.makedirs(folder, exist_ok=True)  # on this node's own disk
        with open(os.path.join(folder, f"decodes-{os.getpid()}.log"), "a") as handle:
            handle.write("".join(f"{u}\n" for u in uris))


@dataclass(frozen=True)
class ExpertSpec:
    """What an expert actor needs (small and picklable)."""

    checkpoint: str  # the recipe's URI: each actor fetches its expert on its own node
    expert: str
    key: str
    cache: str
    dtype: str


class ExpertWorker:
    """Ray Data actor: one frozen expert, loaded once; computes the images of each batch that
    need it and are not cached, writes them as one shard, passes every row on with its status
    (``s_<expert>``: "" not needed, "cached", "computed"), bytes and seconds."""

    def __init__(self, spec: ExpertSpec) -> None:
        self.spec = spec
        local = local_checkpoint(spec.checkpoint, parts=[f"expert:{spec.expert}"])
        self.model, self.resolved, loaded_key = load_expert(local, spec.expert)
        if loaded_key != spec.key:
            raise RuntimeError(f"expert {spec.expert!r} in {spec.checkpoint} changed while the "
                               "job ran")
        self.device = resolve_device("auto")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model.to(self.device, dtype).eval()
        self.cache = FeatureCache(spec.cache)
        self.cache.reader(spec.expert, spec.key)  # opened once per actor, never reloaded

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        name = self.spec.expert
        n = len(batch["uri"])
        status, nbytes, seconds = [""] * n, np.zeros(n, np.int64), np.zeros(n, np.float64)
        rows = [i for i in range(n) if not batch["error"][i]
                and name in str(batch["experts"][i]).split(",")]
        if rows:
            cached = self.cache.cached(name, self.spec.key, [str(batch["hash"][i]) for i in rows])
            todo = [i for i, hit in zip(rows, cached, strict=True) if not hit]
            for i in rows:
                status[i] = "cached"
            if todo:
                start = time.perf_counter()
                nbytes[todo[0]] = self._compute(batch, todo)
                seconds[todo[0]] = time.perf_counter() - start
                for i in todo:
                    status[i] = "computed"
        return {**batch, f"s_{name}": np.array(status, dtype=object), f"b_{name}": nbytes,
                f"t_{name}": seconds}

    def _compute(self, batch: dict[str, np.ndarray], rows: list[int]) -> int:
        images = [Image.frombytes("RGB", (int(batch["width"][i]), int(batch["height"][i])),
                                  bytes(batch["pixels"][i])) for i in rows]
        inputs = torch.stack([expert_input(image, self.resolved) for image in images])
        param = next(self.model.parameters())
        with torch.inference_mode():
            feats = self.model(to_model_inputs(inputs, param.device, param.dtype))
        _, written = self.cache.write_shard(self.spec.expert, self.spec.key,
                                            [str(batch["hash"][i]) for i in rows], feats,
                                            self.spec.dtype)
        return written
