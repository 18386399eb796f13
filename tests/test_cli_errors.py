"""The sa-cache command line given bad input: a clear error naming the option, no traceback.

Usage errors (a bad option value) exit 2; a service that does not answer exits 1.
Also: ``worker --app M:cache --url URL`` (the app's cache moved to another store).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from test_write_behind import WB, Counter, make_cache, wb_env

import sa_cache
from sa_cache.cli import main
from sa_cache.versioning import VersionRegistry
from sa_cache.write_behind import write_behind_for

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"
UNREACHABLE_PG = "postgresql+psycopg://postgres@127.0.0.1:1/nope"
VERSION_ROW = re.compile(r"^│ version\s+│")


@pytest.fixture(autouse=True)
def _no_env_url(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SA_CACHE_URL", "SA_CACHE_NAMESPACE", "SA_CACHE_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def apps(monkeypatch: pytest.MonkeyPatch, namespace: str) -> Iterator[types.ModuleType]:
    """``sacli_app``: ``cache``, an app's write-behind cache built on a Redis nobody runs
    (the worker is pointed elsewhere with ``--url``), and ``notacache``."""
    module = types.ModuleType("sacli_app")
    cache = make_cache(UNREACHABLE_REDIS, namespace)
    module.cache = cache  # type: ignore[attr-defined]
    module.notacache = object()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sacli_app", module)
    yield module
    cache.close()


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def assert_usage_error(result: Result, option: str, *words: str) -> None:
    """Exit 2, ``option`` named, no exception escaped (CliRunner keeps it otherwise)."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert option in result.output, result.output
    for word in words:
        assert word in result.output, result.output


# -- D9: every bad value is a usage error naming its option -------------------------------

USAGE_ERRORS = [
    (["demo", "--requests", "0"], "--requests", ">=1"),
    (["demo", "--requests", "-5"], "--requests", ">=1"),
    (["demo", "--customers", "0"], "--customers", ">=1"),
    (["version", "--grace", "0"], "--grace", ">0"),
    (["gc", "--grace", "-1"], "--grace", ">0"),
    (["gc", "--batch", "0"], "--batch", ">=1"),
    (["version", "--database-url", "notaurl"], "--database-url", "notaurl"),
    (["version", "--database-url", "nosuchdb://h/x"], "--database-url", "nosuchdb"),
    (["version", "--database-url", "postgresql://h:port/x"], "--database-url", ""),
    (["version", "--metadata", "json:dumps"], "--metadata", "MetaData"),
    (["version", "--metadata", "nosuchmod:md"], "--metadata", "nosuchmod"),
    (["invalidate", "--table", ""], "--table", "empty"),
    (["invalidate", "--table", "  "], "--table", "empty"),
    (["invalidate", "--tag", ""], "--tag", "empty"),
    (["invalidate", "--model", "json:dumps"], "--model", "not a mapped class"),
    (["invalidate", "--model", "sa_cache:Cache"], "--model", "not a mapped class"),
    (["invalidate", "--model", "nosuchmod:X"], "--model", "nosuchmod"),
    (["invalidate", "--model", "json"], "--model", "module:attribute"),
    (["warm", "json:dumps"], "TARGET", "Warmer"),
    (["warm", "json:loads", "--url", "mongo://x"], "--url", "mongo"),
    (["warm", "json:loads", "--max-runs", "0"], "--max-runs", ">=1"),
    (["stats", "--namespace", "bad ns"], "--namespace", "bad ns"),
    (["gc", "--namespace", ""], "--namespace", ""),
    (["worker", "--batch-size", "0"], "--batch-size", ">=1"),
    (["worker", "--max-attempts", "0"], "--max-attempts", ">=1"),
    (["worker", "--max-delay", "-1"], "--max-delay", ">=0"),
    (["worker", "--lease-ttl", "0"], "--lease-ttl", ">0"),
    (["worker", "--foreign-key-wait", "-1"], "--foreign-key-wait", ">=0"),
    (["worker", "--app", "nosuchmod:c"], "--app", "nosuchmod"),
    (["worker", "--app", "sacli_app:notacache"], "--app", "not an sa_cache.Cache"),
    (["worker", "--replay", "bogus"], "--replay", "bogus"),
]


@pytest.mark.usefixtures("apps")
@pytest.mark.parametrize(
    ("args", "option", "says"), [pytest.param(*case, id=" ".join(case[0])) for case in USAGE_ERRORS]
)
def test_bad_value_is_a_usage_error_naming_the_option(
    args: list[str], option: str, says: str
) -> None:
    assert_usage_error(invoke(*args), option, says)


def test_stats_blames_the_namespace_not_the_url() -> None:
    result = invoke("stats", "--namespace", "bad ns")
    assert_usage_error(result, "--namespace")
    assert "--url" not in result.output


@pytest.mark.usefixtures("apps")
def test_worker_bad_database_url_is_a_usage_error(redis_url: str) -> None:
    args = ["worker", "--app", "sacli_app:cache", "--url", redis_url, "--drain"]
    assert_usage_error(invoke(*args, "--database-url", "notaurl"), "--database-url", "notaurl")


def test_unreachable_database_is_named_without_a_traceback() -> None:
    result = invoke("version", "--database-url", UNREACHABLE_PG)
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "the database did not answer" in result.output
    assert "127.0.0.1:1" in result.output


@pytest.mark.usefixtures("apps")
def test_worker_unreachable_database_is_named(redis_url: str) -> None:
    args = ["worker", "--app", "sacli_app:cache", "--url", redis_url, "--drain"]
    result = invoke(*args, "--database-url", UNREACHABLE_PG)
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "the database did not answer" in result.output


def test_worker_drain_with_an_unreachable_store_ends_in_an_error(
    tmp_path: Path, namespace: str
) -> None:
    """``--drain`` (the step before a migration) retried an unreachable store forever;
    it now gives up after `DRAIN_ATTEMPTS` failed steps: a one-line error, exit 1."""
    (tmp_path / "drainapp.py").write_text(
        "from test_write_behind import make_cache\n"
        f"cache = make_cache({UNREACHABLE_REDIS!r}, {namespace!r})\n"
    )
    tests = str(Path(__file__).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SA_CACHE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), tests, env.get("PYTHONPATH", "")])
    args = ["worker", "--app", "drainapp:cache", "--url", UNREACHABLE_REDIS, "--drain"]
    database = f"sqlite:///{tmp_path / 'drain.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "sa_cache", *args, "--database-url", database],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "the cache store did not answer" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_installed_script_prints_no_traceback() -> None:
    script = Path(sys.executable).with_name("sa-cache")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SA_CACHE_")}
    for args in (["demo", "--requests", "0"], ["invalidate", "--table", ""]):
        done = subprocess.run(
            [str(script), *args], capture_output=True, text=True, env=env, timeout=60, check=False
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert args[1] in done.stderr


def test_demo_with_fewer_requests_than_a_progress_step() -> None:
    result = invoke("demo", "--requests", "1", "--customers", "1")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "speed-up" in result.output


def test_run_demo_progress_adds_up_and_bad_sizes_are_named() -> None:
    from sa_cache.demo import run_demo

    done: dict[str, int] = {}
    _, _, cache = run_demo(None, 57, 3, progress=lambda n, k: done.update({n: done.get(n, 0) + k}))
    cache.close()
    assert done == {"uncached": 57, "cached": 57}
    for sizes in ((0, 3), (3, 0)):
        with pytest.raises(ValueError, match="must be a positive int"):
            run_demo(None, *sizes)


# -- D8: worker --app M:cache --url URL ------------------------------------------------------


@pytest.fixture
def wb1(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[WB]:
    """A write-behind environment (``test_write_behind``) on every dialect."""
    with wb_env(engine, redis_url, namespace) as env:
        yield env


@pytest.mark.usefixtures("apps")
def test_worker_runs_the_app_cache_on_the_url_given(wb1: WB, engine: sa.Engine) -> None:
    """The app module builds its cache on a Redis nobody runs; ``--url`` names the real one:
    the worker keeps the app's namespace, models and queue settings, on that store."""
    with wb1.Session() as s:
        s.add_all([Counter(id=1, n=3), Counter(id=2, n=4)])
        s.commit()
    assert wb1.db() == {}
    database_url = engine.url.render_as_string(hide_password=False)
    app = ["worker", "--app", "sacli_app:cache", "--url", wb1.url]
    letters = invoke(*app, "--dead-letters")
    assert letters.exit_code == 0, (letters.output, letters.exception)
    assert "0 write-behind dead letters" in letters.output
    result = invoke(*app, "--database-url", database_url, "--drain", "--max-delay", "0")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "applied 2 changes" in result.output
    assert wb1.db() == {1: (3, "new"), 2: (4, "new")}


# -- D10: versions are what the store says -------------------------------------------------


@pytest.fixture
def versioned(redis_url: str, namespace: str) -> Iterator[sa_cache.Cache]:
    """A namespace whose app runs on version ``r1a-abc`` (a live heartbeat in the store)."""
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    VersionRegistry(cache).heartbeat("r1a-abc")
    yield cache
    scan = cache.backend.scan_keys  # type: ignore[attr-defined]
    cache.backend.delete_many(list(scan(f"{namespace}:*")))
    cache.close()


@pytest.mark.parametrize("command", ["stats", "version"])
def test_stats_and_version_show_the_store_s_version(
    command: str, versioned: sa_cache.Cache, redis_url: str
) -> None:
    result = invoke(command, "--url", redis_url, "--namespace", versioned.namespace)
    assert result.exit_code == 0, (result.output, result.exception)
    version_rows = [line for line in result.output.splitlines() if VERSION_ROW.match(line)]
    assert len(version_rows) == 1, result.output
    assert "r1a-abc" in version_rows[0]
    assert "v1" not in version_rows[0]


@pytest.mark.parametrize("command", ["stats", "version"])
def test_without_a_live_version_the_default_is_said_to_be_one(
    command: str, redis_url: str, namespace: str
) -> None:
    result = invoke(command, "--url", redis_url, "--namespace", namespace)
    assert result.exit_code == 0, (result.output, result.exception)
    version_rows = [line for line in result.output.splitlines() if VERSION_ROW.match(line)]
    assert len(version_rows) == 1, result.output
    assert "v1" in version_rows[0]
    assert "default" in version_rows[0]


def test_replaying_an_unknown_dead_letter_names_it_and_replays_nothing(
    redis_url: str, namespace: str
) -> None:
    """``--replay`` with an id that is no dead letter: a usage error naming it (it said
    "replayed 0 dead letters" and exited 0)."""
    cache = make_cache(redis_url, namespace)
    try:
        result = invoke("worker", "--url", redis_url, "--namespace", namespace, "--replay", "1-0")
        assert_usage_error(result, "--replay", "no dead letter with id 1-0")
        queue = write_behind_for(cache)
        with pytest.raises(ValueError, match="1-0, 2-0"):
            queue.replay(["1-0", "1-0", "2-0"])
        with pytest.raises(ValueError, match="not a dead-letter id"):
            queue.replay(["bogus"])
    finally:
        cache.close()


def test_python_dash_m_runs_the_command() -> None:
    """``python -m sa_cache`` is ``sa-cache`` (it did nothing)."""
    out = subprocess.run(
        [sys.executable, "-m", "sa_cache", "--help"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "Usage:" in out.stdout
    assert "demo" in out.stdout


# -- F4/B1: nan and inf are usage errors too (click's FloatRange let them through) ----------


NONFINITE_SECONDS = [
    ["worker", "--lease-ttl", "inf"],
    ["worker", "--lease-ttl", "nan"],
    ["worker", "--max-delay", "nan"],
    ["worker", "--foreign-key-wait", "inf"],
    ["version", "--grace", "nan"],
    ["gc", "--grace", "inf"],
]


@pytest.mark.usefixtures("apps")
@pytest.mark.parametrize("args", NONFINITE_SECONDS, ids=[" ".join(a) for a in NONFINITE_SECONDS])
def test_nonfinite_seconds_are_a_usage_error(args: list[str]) -> None:
    """``worker --lease-ttl inf`` ended in a traceback (exit 1) after connecting."""
    full = [*args, "--app", "sacli_app:cache"] if args[0] == "worker" else args
    assert_usage_error(invoke(*full), args[1], "finite")


def test_the_script_finds_the_application_in_the_directory_it_runs_in(tmp_path: Path) -> None:
    """README runs ``sa-cache warm app:warmer`` / ``sa-cache worker --app app:cache`` from
    the project directory, as flask, celery and uvicorn find their application; the
    installed script's path does not hold that directory, and it said "No module named
    ..." (README audit rc-05)."""
    (tmp_path / "cwdapp.py").write_text(
        "import sa_cache\n"
        "from sqlalchemy import create_engine\n"
        "from sqlalchemy.orm import sessionmaker\n"
        "cache = sa_cache.Cache.from_url('memory://')\n"
        "warmer = sa_cache.Warmer(cache, sessionmaker(create_engine('sqlite://')))\n"
    )
    script = Path(sys.executable).with_name("sa-cache")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SA_CACHE_")}
    env.pop("PYTHONPATH", None)  # (the project is installed: only the directory is missing)
    done = subprocess.run(
        [str(script), "warm", "cwdapp:warmer", "--dry-run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "No module named" not in done.stderr
