"""The ingress's use of the node's feature store: look an image's expert features up before
calling the expert, store what the expert returned after.

A request's image is named by ``image_hash`` (the sha256 of its bytes, computed when the cache
is on; an empty one means no caching). A hit returns at once: the expert is not called (a
scaled-to-zero expert stays at zero); a miss calls it and the result is stored by one writer
thread per expert, off the request's path (at most
:data:`MAX_PENDING_WRITES` wait; more are dropped, as a cache may). Disk work never runs on the
event loop, and metrics are recorded there only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from pipelines.serve.feature_store import FeatureStore, valid_hash
from pipelines.serve.metrics import metric
from pipelines.serve.recipe import FeatureCacheRecipe

log = logging.getLogger(__name__)

MAX_PENDING_WRITES = 4


def open_caches(settings: FeatureCacheRecipe | None,
                keys: dict[str, str]) -> dict[str, ExpertCache]:
    """One cache per expert (``keys``: expert -> its cache key) over the one store the
    recipe's ``feature_cache`` describes on this node; none when it is off."""
    if settings is None or not settings.enabled:
        return {}
    store = FeatureStore(settings.root(), settings.max_mb * 2**20)
    log.info("expert feature cache %s (at most %d MiB) for %s", store.root, settings.max_mb,
             ", ".join(sorted(keys)))
    return {expert: ExpertCache(store, expert, key) for expert, key in keys.items()}


class ExpertCache:
    """The features of one expert (``key``: its cache key) in the node's ``store``, shared by
    the ingress replicas of the node."""

    def __init__(self, store: FeatureStore, expert: str, key: str) -> None:
        store.path(expert, key, "0" * 16)  # a malformed name fails here, not per request
        self.store, self.expert, self.key = store, expert, key
        self.hits = self.misses = self.stored = self.dropped = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"mova-store-{expert}")
        self._pending: set[asyncio.Future] = set()

    async def features(self, item: dict[str, Any],
                       compute: Callable[[dict[str, Any]], Awaitable[torch.Tensor]]
                       ) -> torch.Tensor:
        """The features of ``item``'s image: from the store, else ``compute(item)`` (then
        stored in the background)."""
        image_hash = item.get("image_hash") or ""
        found = await self.lookup(image_hash)
        if found is not None:
            return found
        result = await compute(item)
        self.remember(image_hash, result)
        return result

    async def lookup(self, image_hash: str) -> torch.Tensor | None:
        """The stored features (a hit) or None (a miss; also for no or a malformed hash,
        which are not counted)."""
        if not valid_hash(image_hash):
            return None
        found = await asyncio.to_thread(self.store.get, self.expert, self.key, image_hash)
        result = "miss" if found is None else "hit"
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        metric("feature_cache_lookups").inc(tags={"expert": self.expert, "result": result})
        return found

    def remember(self, image_hash: str, features: torch.Tensor) -> None:
        """Store ``features`` in the writer thread (returns at once)."""
        if not valid_hash(image_hash) or not isinstance(features, torch.Tensor):
            return
        if len(self._pending) >= MAX_PENDING_WRITES:
            self.dropped += 1
            return
        future = asyncio.get_running_loop().run_in_executor(self._writer, self._put,
                                                            image_hash, features)
        self._pending.add(future)
        future.add_done_callback(self._written)

    def _put(self, image_hash: str, features: torch.Tensor) -> bool:
        try:
            return self.store.put(self.expert, self.key, image_hash, features)
        except Exception as exc:  # a full disk, a busy lock: the request is answered anyway
            log.warning("expert %s: could not store features of %s: %r", self.expert,
                        image_hash, exc)
            return False

    def _written(self, future: asyncio.Future) -> None:
        self._pending.discard(future)
        if not future.cancelled() and future.result():
            self.stored += 1
            metric("feature_cache_bytes").set(self.store.bytes_used)

    async def drain(self) -> None:
        """Wait for the writes queued so far (tests, shutdown)."""
        if self._pending:
            await asyncio.gather(*list(self._pending))

    def summary(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "stored": self.stored,
                "dropped": self.dropped, "root": str(self.store.root), "key": self.key}
