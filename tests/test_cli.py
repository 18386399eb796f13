"""The sa-cache command line, run in process with click's runner."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import sa_cache
from sa_cache.cli import main


def test_demo_prints_its_table_on_the_embedded_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SA_CACHE_URL", raising=False)
    result = CliRunner().invoke(main, ["demo", "--requests", "60", "--customers", "50"])
    assert result.exit_code == 0, result.output
    for label in ("queries", "cache hits", "hit rate", "statements saved", "time per request"):
        assert label in result.output
    assert "memory://" in result.output


def test_demo_on_redis(redis_url: str) -> None:
    result = CliRunner().invoke(main, ["demo", "--url", redis_url, "--requests", "40"])
    assert result.exit_code == 0, result.output
    assert redis_url in result.output


def test_invalidate_bumps_generations(redis_url: str, namespace: str) -> None:
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    keys = (*cache.generation_keys(["orders"]), cache.keys.tag("geo"))
    before = cache.fetch(list(keys))
    args = ["invalidate", "--url", redis_url, "--namespace", namespace]
    result = CliRunner().invoke(main, [*args, "--table", "orders", "--tag", "geo", "--all"])
    assert result.exit_code == 0, result.output
    after = cache.fetch(list(keys))
    assert all(a != b for a, b in zip(after, before, strict=True))
    cache.backend.delete_many([*keys, cache.clock_key])


def test_invalidate_needs_a_target_and_a_store() -> None:
    assert CliRunner().invoke(main, ["invalidate"]).exit_code == 2
    down = CliRunner().invoke(main, ["invalidate", "--all", "--url", "redis://127.0.0.1:1/0"])
    assert down.exit_code == 1
    assert "did not answer" in down.output


def test_bad_url_is_named() -> None:
    for command in ("gc", "demo", "version"):
        result = CliRunner().invoke(main, [command, "--url", "mongo://x"])
        assert result.exit_code == 2
        assert "unknown cache URL scheme 'mongo'" in result.output


def test_version_and_gc_commands(redis_url: str, namespace: str) -> None:
    runner = CliRunner()
    shown = runner.invoke(main, ["version", "--url", redis_url, "--namespace", namespace])
    assert shown.exit_code == 0, shown.output
    assert namespace in shown.output
    swept = runner.invoke(main, ["gc", "--url", redis_url, "--namespace", namespace, "--dry-run"])
    assert swept.exit_code == 0, swept.output
    assert "no retired versions" in swept.output


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_stats_counts_what_the_namespace_holds(
    store: str, namespace: str, request: pytest.FixtureRequest
) -> None:
    from sa_cache.metrics import store_report

    url = "memory://" if store == "memory" else request.getfixturevalue("redis_url")
    cache = sa_cache.Cache.from_url(url, namespace=namespace)
    cache.set_many({f"k{i}": i for i in range(3)})
    cache.invalidate("orders")  # generation keys: clock, orders, orders!rows
    report = store_report(cache)
    assert report["entries"] == {"v1 cache-aside values": 3}
    # (and the namespace-wide one the cache-aside values carry)
    # (and, on Redis, the run of the server the namespace was last checked on)
    epoch = {"store epoch": 1} if store == "redis" else {}
    assert report["bookkeeping"] == {"generations": 4, **epoch}
    assert ("server" in report) == (store == "redis")
    if store == "redis":
        result = CliRunner().invoke(main, ["stats", "--url", url, "--namespace", namespace])
        assert result.exit_code == 0, result.output
        assert "v1 cache-aside values" in result.output
        scan = cache.backend.scan_keys
        cache.backend.delete_many(list(scan(f"{namespace}:*")))
    cache.close()
