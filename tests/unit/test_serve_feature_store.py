"""The node's expert feature cache for serving, without Ray: the disk store (round trip, LRU
under a byte bound, processes sharing it, corrupt entries, cache keys), the expert replica's
lookup-then-batch logic, the recipe section and the image key the ingress sends."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import threading
import time
from pathlib import Path

import pytest
import torch

from mova.decoding import DecodeParams
from mova.factory import build_tiny_mova
from pipelines.common.recipe import load_recipe
from pipelines.serve import expert_cache
from pipelines.serve.expert_cache import ExpertCache, open_caches
from pipelines.serve.feature_store import LOCK_FILE, FeatureStore
from pipelines.serve.recipe import FeatureCacheRecipe, ServeRecipe
from pipelines.serve.request_flow import Pipeline, Prepared, PromptChecker

JOBS = Path(__file__).resolve().parents[2] / "jobs"
KEY = "0123456789abcdef0123"
SHAPE = (1, 16, 32)  # one entry: 2 KiB of float32 plus its header


def _hash(tag: object) -> str:
    return hashlib.sha256(str(tag).encode()).hexdigest()


def _tensor(tag: object) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(_hash(tag)[:8], 16))
    return torch.randn(SHAPE, generator=gen)


def _counted(root: Path) -> int:
    return int((root / LOCK_FILE).read_text())


def _entry_bytes(tmp_path: Path) -> int:
    probe = FeatureStore(tmp_path / "probe", 1 << 30)
    probe.put("sam", KEY, _hash("probe"), _tensor("probe"))
    return probe.usage()


# ---- the store ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_put_get_round_trip_keeps_dtype_shape_and_values(tmp_path, dtype):
    store = FeatureStore(tmp_path, 1 << 20)
    value = (torch.randn(1, 7, 5) * 100).to(dtype)
    h = _hash("a")
    assert store.get("dinov2", KEY, h) is None
    assert store.put("dinov2", KEY, h, value)
    assert (tmp_path / "dinov2" / KEY / h[:2] / f"{h}.safetensors").is_file()
    got = store.get("dinov2", KEY, h)
    assert got.dtype == dtype and got.shape == (1, 7, 5) and torch.equal(got, value)
    got.add_(1)  # the caller owns what it got; the entry is unchanged
    assert torch.equal(store.get("dinov2", KEY, h), value)
    assert store.bytes_used == store.usage() == _counted(tmp_path)


def test_malformed_names_are_refused(tmp_path):
    store = FeatureStore(tmp_path, 1 << 20)
    for expert, key, h in (("../x", KEY, _hash(1)), ("sam", "a/b", _hash(1)),
                           ("sam", KEY, "../../etc"), ("sam", KEY, _hash(1).upper())):
        with pytest.raises(ValueError, match="feature store"):
            store.path(expert, key, h)
    with pytest.raises(ValueError, match="max_bytes"):
        FeatureStore(tmp_path, 0)


def test_lru_eviction_under_a_byte_bound_with_recency_refreshed_by_get(tmp_path):
    size = _entry_bytes(tmp_path)
    root = tmp_path / "store"
    store = FeatureStore(root, int(3.5 * size))  # three fit; evictions leave <= 3.15 entries

    def path(tag: str) -> Path:
        return store.path("sam", KEY, _hash(tag))

    for tag in ("a", "b", "c"):
        store.put("sam", KEY, _hash(tag), _tensor(tag))
        time.sleep(0.02)
    assert store.get("sam", KEY, _hash("a")) is not None  # a is now the most recent
    time.sleep(0.02)
    store.put("sam", KEY, _hash("d"), _tensor("d"))
    assert [path(t).exists() for t in "abcd"] == [True, False, True, True]  # b went first
    time.sleep(0.02)
    store.put("sam", KEY, _hash("e"), _tensor("e"))
    assert [path(t).exists() for t in "abcde"] == [True, False, False, True, True]
    assert store.usage() == 3 * size == _counted(root) == store.bytes_used <= store.max_bytes
    assert torch.equal(store.get("sam", KEY, _hash("e")), _tensor("e"))
    too_big = FeatureStore(tmp_path / "small", size - 1)
    assert not too_big.put("sam", KEY, _hash("x"), _tensor("x"))
    assert too_big.usage() == 0


def test_a_put_under_the_bound_does_not_scan_the_store(tmp_path, monkeypatch):
    size = _entry_bytes(tmp_path)
    store = FeatureStore(tmp_path / "store", 10 * size)
    scans = []
    real = FeatureStore._entries

    def counting(self):
        scans.append(1)
        return real(self)

    monkeypatch.setattr(FeatureStore, "_entries", counting)
    store.put("sam", KEY, _hash(0), _tensor(0))
    assert len(scans) == 1  # the first put finds no count: it counts once
    for i in range(1, 10):
        store.put("sam", KEY, _hash(i), _tensor(i))
    assert len(scans) == 1
    store.put("sam", KEY, _hash(10), _tensor(10))  # over the bound: one scan evicts
    assert len(scans) == 2 and store.usage() <= 9 * size


def _process(root: str, max_bytes: int, me: str, other: str, n: int, barrier, out) -> None:
    """Puts ``n`` entries at once with the other process (both past the bound), then two more
    each (the newest of all), then reads the other's."""
    store = FeatureStore(root, max_bytes)
    for i in range(n):
        store.put("sam", KEY, _hash((me, i)), _tensor((me, i)))
    barrier.wait(timeout=120)
    for i in (n, n + 1):
        store.put("sam", KEY, _hash((me, i)), _tensor((me, i)))
    barrier.wait(timeout=120)
    seen = {}
    for i in range(n + 2):
        got = store.get("sam", KEY, _hash((other, i)))
        if got is not None:
            seen[i] = bool(torch.equal(got, _tensor((other, i))))
    out.put((me, seen))


def test_two_processes_share_one_store_within_its_bound(tmp_path):
    size = _entry_bytes(tmp_path)
    root, n, bound = tmp_path / "store", 12, 8 * size
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_process, args=(str(root), bound, me, other, n, barrier, out))
             for me, other in (("p", "q"), ("q", "p"))]
    for proc in procs:
        proc.start()
    try:
        results = dict(out.get(timeout=180) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert [proc.exitcode for proc in procs] == [0, 0]
    for me in ("p", "q"):  # each read the other's newest entries, bit for bit
        assert {n, n + 1} <= set(results[me]) and all(results[me].values()), results
    store = FeatureStore(root, bound)
    assert store.usage() <= bound and store.usage() == _counted(root)
    assert store.usage() >= 4 * size  # an eviction leaves 90% of the bound, never empties it


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_image"])
def test_a_corrupt_entry_is_a_logged_miss_and_is_removed(tmp_path, caplog, damage):
    store = FeatureStore(tmp_path, 1 << 20)
    h, other = _hash("a"), _hash("b")
    store.put("sam", KEY, h, _tensor("a"))
    store.put("sam", KEY, other, _tensor("b"))
    path = store.path("sam", KEY, h)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-9])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    else:
        path.write_bytes(store.path("sam", KEY, other).read_bytes())
    caplog.set_level(logging.WARNING)
    assert store.get("sam", KEY, h) is None
    assert not path.exists() and "unreadable" in caplog.text and path.name in caplog.text
    assert store.get("sam", KEY, other) is not None
    assert store.put("sam", KEY, h, _tensor("a"))  # stored again
    assert torch.equal(store.get("sam", KEY, h), _tensor("a"))


def test_a_changed_cache_key_misses(tmp_path):
    store = FeatureStore(tmp_path, 1 << 20)
    h = _hash("a")
    store.put("sam", KEY, h, _tensor("a"))
    assert store.get("sam", "fedcba9876543210fedc", h) is None
    assert store.get("dinov2", KEY, h) is None
    assert store.get("sam", KEY, h) is not None


# ---- the expert replica's logic ------------------------------------------------------------
def test_the_expert_cache_looks_up_before_computing_and_stores_after(tmp_path):
    cache = ExpertCache(FeatureStore(tmp_path, 1 << 20), "sam", KEY)
    computed: list[str] = []

    async def compute(item):
        computed.append(item.get("image_hash"))
        return _tensor(len(computed))

    async def scenario():
        first = await cache.features({"image_hash": _hash("a"), "deadline": 0}, compute)
        await cache.drain()
        again = await cache.features({"image_hash": _hash("a"), "deadline": 0}, compute)
        assert torch.equal(first, again)
        for item in ({"image_hash": ""}, {}, {"image_hash": "not-a-hash"}):
            await cache.features(item, compute)  # no key: computed, not stored, not counted
        await cache.drain()

    asyncio.run(scenario())
    assert computed == [_hash("a"), "", None, "not-a-hash"]  # "a" once: then a hit
    assert (cache.hits, cache.misses, cache.stored) == (1, 1, 1)
    assert cache.store.usage() == cache.store.bytes_used > 0
    changed = ExpertCache(cache.store, "sam", "fedcba9876543210fedc")  # the expert changed
    assert asyncio.run(changed.lookup(_hash("a"))) is None


def test_the_expert_cache_drops_writes_beyond_its_queue(tmp_path, monkeypatch):
    cache = ExpertCache(FeatureStore(tmp_path, 1 << 20), "sam", KEY)
    gate = threading.Event()
    real_put = cache.store.put

    def slow_put(*args):
        gate.wait(30)
        return real_put(*args)

    monkeypatch.setattr(cache.store, "put", slow_put)

    async def scenario():
        for i in range(expert_cache.MAX_PENDING_WRITES + 2):
            cache.remember(_hash(i), _tensor(i))
        gate.set()
        await cache.drain()

    asyncio.run(scenario())
    assert (cache.stored, cache.dropped) == (expert_cache.MAX_PENDING_WRITES, 2)


def test_the_recipe_section(tmp_path):
    keys = {"sam": KEY, "dinov2": "fedcba9876543210fedc"}
    assert open_caches(FeatureCacheRecipe(), keys) == {}  # off by default
    assert open_caches(None, keys) == {}
    on = open_caches(FeatureCacheRecipe(max_mb=2, dir=str(tmp_path)), keys)
    assert {n: c.key for n, c in on.items()} == keys
    assert on["sam"].store is on["dinov2"].store  # one store (and byte bound) per node
    assert on["sam"].store.root == tmp_path and on["sam"].store.max_bytes == 2 * 2**20
    served = load_recipe(ServeRecipe, JOBS / "serve.yaml", ["checkpoint=x"])
    assert served.feature_cache.enabled and served.feature_cache.max_mb == 1024
    assert served.feature_cache.root().name == "serve-features"
    for override, match in (("feature_cache.max_mb=-1", "max_mb=-1"),
                            ("feature_cache.dir=relative/dir", "absolute")):
        with pytest.raises(ValueError, match=match):
            load_recipe(ServeRecipe, JOBS / "serve.yaml", ["checkpoint=x", override])


# ---- what the ingress and the pipeline send ---------------------------------------------------
class _Response:
    def __init__(self, value) -> None:
        self.value = value

    def __await__(self):
        async def result():
            return self.value
        return result().__await__()

    def cancel(self) -> None:
        pass


class _Method:
    def __init__(self, fn, calls: list) -> None:
        self.fn, self.calls = fn, calls

    def remote(self, item):
        self.calls.append(item)
        return _Response(self.fn(item))


def test_the_pipeline_sends_each_expert_the_image_and_its_hash():
    calls: dict[str, list] = {"sam": [], "dinov2": []}
    adapter = type("A", (), {})()
    adapter.encode = _Method(lambda item: {"base": 0, "text": 0, "routing_tokens": 0}, [])
    adapter.fuse = _Method(lambda item: {"gate_weights": [], "image_tokens": None}, [])
    experts = {}
    for name in calls:
        experts[name] = type("E", (), {})()
        experts[name].features = _Method(lambda item: torch.zeros(1, 2, 3), calls[name])
    prep = Prepared(image="pixels", questions=["q"], prompt_ids=[1],
                    params=DecodeParams(max_new_tokens=1), forced=["dinov2", "sam"],
                    deadline=time.time() + 30, image_hash=_hash("a"))
    vision = asyncio.run(Pipeline(adapter, None, experts).vision(prep))
    assert vision.experts == ["dinov2", "sam"]
    for name in calls:
        assert calls[name] == [{"image": "pixels", "image_hash": _hash("a"),
                                "deadline": prep.deadline}]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    ckpt = tmp_path_factory.mktemp("serve-cache") / "ckpt"
    build_tiny_mova(seed=0, experts=["sam"]).save_pretrained(ckpt)
    return ckpt


def test_the_ingress_key_is_the_sha256_of_the_image_bytes_only_when_the_cache_is_on(
        tiny_checkpoint):
    ckpt = str(tiny_checkpoint)
    data = b"\x89PNG not really"
    on = PromptChecker(ckpt, load_recipe(ServeRecipe, JOBS / "serve.yaml", [f"checkpoint={ckpt}"]))
    off = PromptChecker(ckpt, ServeRecipe(checkpoint=ckpt))
    assert on.image_key(data) == hashlib.sha256(data).hexdigest()
    assert off.image_key(data) == ""


@pytest.mark.parametrize("cache", [True, False])
def test_a_repeated_image_skips_the_expert_call(tiny_checkpoint, tmp_path, cache):
    """The ingress's pipeline with the checker's caches (as the ingress builds them): the same
    image twice, then with no hash; with the cache on the repeat never calls the expert."""
    ckpt = str(tiny_checkpoint)
    overrides = [f"checkpoint={ckpt}", f"feature_cache.dir={tmp_path}",
                 f"feature_cache.max_mb={16 if cache else 0}"]
    checker = PromptChecker(ckpt, load_recipe(ServeRecipe, JOBS / "serve.yaml", overrides))
    assert set(checker.caches) == ({"sam"} if cache else set())
    calls: list = []
    adapter = type("A", (), {})()
    adapter.encode = _Method(lambda item: {"base": 0, "text": 0, "routing_tokens": 0}, [])
    adapter.fuse = _Method(lambda item: {"gate_weights": [], "image_tokens": None}, [])
    expert = type("E", (), {})()
    expert.features = _Method(lambda item: torch.randn(1, 4, 3), calls)
    pipeline = Pipeline(adapter, None, {"sam": expert}, checker.caches)

    async def scenario() -> list[torch.Tensor]:
        out = []
        for image_hash in (_hash("red"), _hash("red"), ""):
            prep = Prepared(image="pixels", questions=["q"], prompt_ids=[1],
                            params=DecodeParams(max_new_tokens=1), forced=["sam"],
                            deadline=time.time() + 30, image_hash=image_hash)
            await pipeline.vision(prep)
            out.append(adapter.fuse.calls[-1]["experts"]["sam"])
            for c in checker.caches.values():
                await c.drain()
        return out

    first, again, unkeyed = asyncio.run(scenario())
    assert len(calls) == (2 if cache else 3)  # with the cache the repeat called no expert
    assert torch.equal(first, again) == cache and not torch.equal(first, unkeyed)
    if cache:
        assert checker.caches["sam"].summary() | {"root": None} == {
            "hits": 1, "misses": 1, "stored": 1, "dropped": 0, "root": None,
            "key": checker.caches["sam"].key}
