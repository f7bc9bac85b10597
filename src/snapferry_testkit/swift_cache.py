"""The test Swift proxy's cache filter: an in-process stand-in for memcached, run by Debian's python3.

tempauth needs env['swift.cache'] (without it every call is a 500, "Memcache required"), and
egg:swift#memcache without a memcached floods the log. SwiftServer copies this file into its
scratch directory and puts only that directory on the servers' PYTHONPATH: so it must import
nothing but the standard library, and runs on whatever python3 Debian has.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# memcached reads an expiry above 30 days as a Unix time, below as seconds from now.
_RELATIVE_LIMIT = 30 * 24 * 3600
# Account and container info (their stats and metadata) is not kept: the proxy would serve it up
# to 60 s old (recheck_*_existence), and an object PUT does not refresh it, so a quota check would
# miss the bytes just written. Without it the proxy asks the account and container servers each time.
_UNCACHED = ("account/", "container/")


class DictCache:
    """The part of swift.common.memcached.MemcacheRing that the proxy, tempauth and s3api call."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[float, Any]] = {}

    @staticmethod
    def _deadline(ttl: float) -> float:
        if ttl <= 0:
            return float("inf")
        return ttl if ttl > _RELATIVE_LIMIT else time.time() + ttl

    def get(self, key: str, raise_on_error: bool = False) -> Any:
        item = self._items.get(key)
        if item is None:
            return None
        deadline, stored = item
        if deadline < time.time():
            del self._items[key]
            return None
        # A copy, as memcached hands out: the proxy may change the dicts it reads.
        return _load(stored)

    def set(
        self, key: str, value: Any, serialize: bool = True, time: float = 0, min_compress_len: int = 0, raise_on_error: bool = False
    ) -> None:
        if key.startswith(_UNCACHED):
            return
        self._items[key] = (self._deadline(time), _dump(value) if serialize else ("raw", value))

    def incr(self, key: str, delta: int = 1, time: float = 0) -> int:
        current = self.get(key)
        value = int(current or 0) + delta
        self.set(key, max(value, 0), time=time)
        return max(value, 0)

    def decr(self, key: str, delta: int = 1, time: float = 0) -> int:
        return self.incr(key, -delta, time)

    def delete(self, key: str, server_key: str | None = None) -> None:
        self._items.pop(key, None)

    def get_multi(self, keys: Iterable[str], server_key: str) -> list[Any]:
        return [self.get(key) for key in keys]

    def set_multi(
        self, mapping: dict[str, Any], server_key: str, serialize: bool = True, time: float = 0, min_compress_len: int = 0
    ) -> None:
        for key, value in mapping.items():
            self.set(key, value, serialize, time)


def _dump(value: Any) -> tuple[str, str]:
    return ("json", json.dumps(value))


def _load(stored: tuple[str, Any]) -> Any:
    kind, payload = stored
    return json.loads(payload) if kind == "json" else payload


def filter_factory(global_conf: dict[str, str], **local_conf: str) -> Callable[[WsgiApp], WsgiApp]:
    """paste.filter_factory: one DictCache for the proxy process, put in every request's environ."""
    cache = DictCache()

    def make_filter(app: WsgiApp) -> WsgiApp:
        def cache_filter(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            environ["swift.cache"] = cache
            return app(environ, start_response)

        return cache_filter

    return make_filter
