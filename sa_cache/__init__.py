"""sa_cache: a caching layer for SQLAlchemy 2.x ORM applications."""

from __future__ import annotations

import importlib
from types import ModuleType

from .backends.base import NO_VALUE, Backend, BackendError
from .cache import Cache
from .config import CacheConfig
from .query import NotCacheable, with_cache
from .session import CachingSession
from .visibility import WriteBehindLockError
from .warming import Warmer
from .write_behind import WriteBehindUnavailable

__all__ = [
    "NO_VALUE",
    "Backend",
    "BackendError",
    "Cache",
    "CacheConfig",
    "CachingSession",
    "NotCacheable",
    "Warmer",
    "WriteBehindLockError",
    "WriteBehindUnavailable",
    "with_cache",
]

__version__ = "0.1.0"

_LAZY_MODULES = frozenset({"alembic", "versioning"})
"""Submodules reachable as ``sa_cache.<name>`` after a plain ``import sa_cache`` (as
README and DESIGN write ``sa_cache.alembic.run_migrations(...)``), imported on first
use: alembic is not imported by an application that never migrates."""


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
