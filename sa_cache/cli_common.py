"""What every ``sa-cache`` command shares: the ``--url`` / ``--namespace`` options, loading
the application's ``module:attribute``, and the database named on the command line.

A bad value is a usage error (exit 2) naming its option; a service that does not answer
is a `click.ClickException` (exit 1). Neither shows a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    import sqlalchemy as sa


def _check_namespace(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from .keys import check_namespace

    try:
        return check_namespace(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


class Seconds(click.types.FloatParamType):
    """A finite number of seconds, ``> 0`` (or ``>= 0`` with ``zero``). click's
    ``FloatRange`` lets ``nan`` and ``inf`` through, which then fail inside the command
    with a traceback; here they are a usage error naming the option."""

    name = "seconds"

    def __init__(self, zero: bool = False) -> None:
        self.zero = zero

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from .freshness import check_seconds

        number = super().convert(value, param, ctx)  # not a number: click's own usage error
        try:
            return check_seconds("seconds", number, zero=self.zero)
        except ValueError:
            bound = "x>=0" if self.zero else "x>0"
            self.fail(f"{value!r} is not a finite number in the range {bound}", param, ctx)


url_option = click.option(
    "--url",
    default=lambda: os.environ.get("SA_CACHE_URL") or "memory://",
    help="Cache URL (default: $SA_CACHE_URL, then memory://).",
)

namespace_option = click.option(
    "--namespace",
    default=lambda: os.environ.get("SA_CACHE_NAMESPACE") or "sa_cache",
    show_default="$SA_CACHE_NAMESPACE or sa_cache",
    callback=_check_namespace,
    help="Key namespace of the application.",
)


def load_target(target: str, param_hint: str | None = None) -> Any:
    """Import ``module:attribute`` (the application's own code, named on the command line);
    a bad name is a usage error that says what could not be loaded."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise click.BadParameter(
            f"expected module:attribute, got {target!r}", param_hint=param_hint
        )
    # As flask, celery and uvicorn do: the application's module is found in the directory
    # the command runs in (an installed console script's path does not hold it).
    try:
        here = os.getcwd()
    except OSError:  # (a directory removed since the command started: nothing to find there)
        here = None
    if here is not None and here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"cannot load {target}: {exc}", param_hint=param_hint) from exc
    return obj


def create_engine(url: str, param_hint: str = "--database-url", **kwargs: Any) -> sa.Engine:
    """A synchronous engine for ``url``; an unusable URL is a usage error naming the option.

    Never connects: an unreachable database shows in `database_errors`.
    """
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(url, **kwargs)
    except (sa.exc.ArgumentError, ImportError, ValueError, TypeError) as exc:
        # ArgumentError: not a URL / unknown dialect; ImportError: driver not installed;
        # ValueError: e.g. a non-numeric port
        raise click.BadParameter(
            f"cannot use {url!r}: {type(exc).__name__}: {exc}", param_hint=param_hint
        ) from exc
    if engine.dialect.is_async:
        engine.dispose()
        raise click.BadParameter(
            f"{engine.url.drivername} is an asyncio driver; give a synchronous one "
            "(e.g. postgresql+psycopg://, mysql+pymysql://)",
            param_hint=param_hint,
        )
    return engine


@contextmanager
def database_errors(engine: sa.Engine) -> Iterator[None]:
    """Turn a database failure (unreachable, refused, missing schema...) into an error
    message naming the database (password hidden) instead of a traceback."""
    import sqlalchemy as sa

    try:
        yield
    except sa.exc.DBAPIError as exc:
        lines = str(exc.orig if exc.orig is not None else exc).strip().splitlines()
        reason = lines[0] if lines else type(exc).__name__
        down = isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError))
        what = "did not answer" if down else "failed"
        raise click.ClickException(
            f"the database {what} ({engine.url.render_as_string()}): {reason}"
        ) from exc
