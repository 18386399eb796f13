"""Service discovery for tests: env var, then the default local port, then testcontainers.

A service that cannot be found skips the test with the reason, except in CI
(``CI=true``), where it fails: CI must run every test, not skip it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from redis_servers import redis_cluster_url, redis_url  # noqa: F401

IN_CI = os.environ.get("CI", "").lower() == "true"

DEFAULT_URLS = {
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "mariadb": "mysql+pymysql://root@127.0.0.1:3306/test",
}
ENV_VARS = {
    "postgresql": "SA_CACHE_TEST_POSTGRES_URL",
    "mariadb": "SA_CACHE_TEST_MARIADB_URL",
}


def missing_service(reason: str) -> None:
    """Skip the test, or fail it in CI, because a service is missing."""
    if IN_CI:
        pytest.fail(f"CI=true and a required service is missing: {reason}")
    pytest.skip(reason)


def _answers(url: str) -> str | None:
    engine = sa.create_engine(url, connect_args=_connect_args(url))
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        engine.dispose()


def _connect_args(url: str) -> dict[str, object]:
    if url.startswith("postgresql"):
        return {"connect_timeout": 3}
    if url.startswith("mysql"):
        return {"connect_timeout": 3}
    return {}


def _from_testcontainers(kind: str) -> tuple[str, object] | None:
    """Start a container when a Docker engine answers; None otherwise."""
    try:
        if kind == "postgresql":
            from testcontainers.postgres import PostgresContainer

            pg = PostgresContainer("postgres:16", driver="psycopg")
            pg.start()
            return pg.get_connection_url(), pg
        from testcontainers.mysql import MySqlContainer

        my = MySqlContainer("mariadb:11", dialect="pymysql")
        my.start()
        return my.get_connection_url(), my
    except Exception:
        return None


_found: dict[str, str] = {}
_problems: dict[str, str] = {}


def database_url(kind: str) -> str:
    """URL of a reachable database of ``kind`` (sqlite, postgresql, mariadb)."""
    if kind == "sqlite":
        return "sqlite://"
    if kind in _found:
        return _found[kind]
    if kind not in _problems:
        url = os.environ.get(ENV_VARS[kind]) or DEFAULT_URLS[kind]
        problem = _answers(url)
        if problem is None:
            _found[kind] = url
            return url
        started = _from_testcontainers(kind)
        if started is not None:
            _found[kind] = started[0]
            return started[0]
        _problems[kind] = f"{kind} not reachable at {url} ({problem}) and no Docker engine"
    missing_service(_problems[kind])
    raise AssertionError("unreachable")


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def dialect_name(request: pytest.FixtureRequest) -> str:
    """Run the test once per supported database."""
    return str(request.param)


@pytest.fixture
def engine(dialect_name: str, tmp_path: object) -> Iterator[sa.Engine]:
    """An engine on the dialect under test. SQLite is a file, so threads share it."""
    if dialect_name == "sqlite":
        url = f"sqlite:///{tmp_path}/test.db"
        eng = sa.create_engine(url)

        @sa.event.listens_for(eng, "connect")
        def _wal(dbapi_conn: Any, record: Any) -> None:
            # readers do not block writers, as on the other databases
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
    else:
        url = database_url(dialect_name)
        eng = sa.create_engine(url, connect_args=_connect_args(url), pool_pre_ping=True)
    yield eng
    eng.dispose()


@pytest.fixture
def namespace() -> str:
    """A key namespace of the test's own, so tests never touch each other's keys."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["memory", "redis"])
def cache_url(request: pytest.FixtureRequest) -> str:
    """Run the test on the embedded store and on Redis."""
    if request.param == "memory":
        return "memory://"
    return str(request.getfixturevalue("redis_url"))


@pytest.fixture
def wb_sqlite(tmp_path: Path, namespace: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A write-behind environment (see ``test_write_behind.wb_env``) on a SQLite file."""
    from test_write_behind import wb_env

    url = request.getfixturevalue("redis_url")  # the fixture imported above
    engine = sa.create_engine(f"sqlite:///{tmp_path}/wb.db")
    try:
        with wb_env(engine, url, namespace) as env:
            yield env
    finally:
        engine.dispose()
