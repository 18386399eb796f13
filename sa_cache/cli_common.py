"""What every ``sa-cache`` command shares: the ``--url`` / ``--namespace`` options and
loading the application's ``module:attribute``."""

from __future__ import annotations

import importlib
import os
from typing import Any

import click

url_option = click.option(
    "--url",
    default=lambda: os.environ.get("SA_CACHE_URL") or "memory://",
    help="Cache URL (default: $SA_CACHE_URL, then memory://).",
)

namespace_option = click.option(
    "--namespace",
    default=lambda: os.environ.get("SA_CACHE_NAMESPACE") or "sa_cache",
    show_default="$SA_CACHE_NAMESPACE or sa_cache",
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
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"cannot load {target}: {exc}", param_hint=param_hint) from exc
    return obj
