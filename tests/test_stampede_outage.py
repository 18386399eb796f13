"""Single flight while the store does not answer."""

from __future__ import annotations

import threading

from helpers import StalledLoad
from redis_servers import free_port

import sa_cache


def test_a_miss_after_an_invalidation_never_takes_an_older_load_while_the_store_is_down(
    namespace: str,
) -> None:
    """Thread A loads (it read the source, then stalls); the source changes and the key
    is deleted (remembered: the store is down); a caller's miss then must load the new
    value. With the store up, the delete's tombstone keeps it out of A's flight; down,
    every caller read "nothing" and joined A's flight, getting the older value."""
    cache = sa_cache.Cache.from_url(f"redis://127.0.0.1:{free_port()}/0", namespace=namespace)
    source = {"v": "old"}
    slow = StalledLoad(source)
    began, release = slow.began, slow.release

    got: list[str] = []
    a = threading.Thread(target=lambda: got.append(cache.get_or_set("k", slow, ttl=60)))
    a.start()
    try:
        assert began.wait(10)
        source["v"] = "new"
        cache.delete("k")
        result: list[str] = []
        reader = lambda: result.append(cache.get_or_set("k", lambda: source["v"]))  # noqa: E731
        b = threading.Thread(target=reader)
        b.start()
        b.join(2)  # (joined to A's flight, it would wait for A)
        release.set()
        b.join(10)
        assert result == ["new"]
        assert cache.stats["load.store_down"] == 2
    finally:
        release.set()
        a.join(10)
        cache.close()
    assert got == ["old"]  # A's own load, as it read it
