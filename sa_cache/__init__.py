"""sa_cache: a caching layer for SQLAlchemy 2.x ORM applications."""

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
