"""The `with_cache()` option: what a statement asks of the query cache, and how the
execute hook (`query`) finds it on an execution."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import UserDefinedOption

from .freshness import Freshness
from .query_shape import NotCacheable

if TYPE_CHECKING:
    from .cache import Cache

__all__ = ["REFRESH_OPTION", "bypass", "find_option", "option_of", "with_cache"]

log = logging.getLogger("sa_cache")

REFRESH_OPTION = "sa_cache_refresh"
"""Execution option: run the statement and store its result even over a valid entry
(the warmer sets it, so that a re-run renews entries instead of reading them)."""


class with_cache(UserDefinedOption):
    """Cache the results of this statement: ``select(...).options(with_cache(ttl=60))``.

    ``ttl`` seconds (default: the cache's ``default_ttl``); ``name`` labels the query
    in stats; ``tags`` can be invalidated together with ``cache.invalidate_tags``;
    ``relationships=True`` also caches lazy loads of objects this query loaded
    (eager ``selectinload`` / ``subqueryload`` SELECTs are always cached with it);
    ``strict=True`` raises `NotCacheable` instead of bypassing the cache.

    Concurrent misses of one key in a process run the query once; ``lease=True`` makes
    that one load across processes too (a Redis lease: two more round trips per miss).
    ``stale_ttl`` seconds after expiry the rows are still served while one caller
    reloads them, or when the database fails (never after a write to a table they
    read); ``refresh_ahead`` (a fraction of the TTL) and ``beta`` (XFetch) refresh hot
    entries in the background before they expire.
    """

    __slots__ = (
        "_fresh", "beta", "lease", "name", "refresh_ahead", "relationships", "stale_ttl",
        "strict", "tags", "ttl",
    )  # fmt: skip
    propagate_to_loaders = True

    def __init__(
        self,
        ttl: float | None = None,
        name: str | None = None,
        tags: tuple[str, ...] | list[str] = (),
        relationships: bool = False,
        strict: bool = False,
        *,
        stale_ttl: float = 0.0,
        refresh_ahead: float | None = None,
        beta: float = 1.0,
        lease: bool = False,
    ) -> None:
        Freshness(ttl or 1.0, stale_ttl, refresh_ahead, beta)  # ValueError names a bad field
        if ttl is not None and (not isinstance(ttl, (int, float)) or ttl <= 0):
            raise ValueError(f"with_cache ttl must be positive seconds or None, got {ttl!r}")
        if isinstance(tags, str):
            raise TypeError("with_cache tags must be a sequence of str, not a str")
        self.ttl = ttl
        self.name = name
        self.tags = tuple(tags)
        self.relationships = relationships
        self.strict = strict
        self.stale_ttl, self.refresh_ahead, self.beta = stale_ttl, refresh_ahead, beta
        self.lease = lease
        self._fresh: tuple[Any, Freshness] | None = None  # (config, its policy), memoized
        super().__init__(payload=None)

    def entity_served(self, write: str) -> bool:
        """May a primary-key select of a model registered ``write=...`` with this option
        be answered from the row's entity entry? Not when the option asks for what an
        entity entry does not carry: ``tags`` (`Cache.invalidate_tags` reaches the query's
        own entry) and cached lazy loads (``relationships=True``) — but always for a
        write-behind model, whose entry is the row (the database trails it)."""
        return write == "behind" or not (self.tags or self.relationships)

    def freshness(self, cache: Cache) -> Freshness:
        """The freshness policy of this option in ``cache`` (ttl defaults to its default)."""
        memo = self._fresh
        if memo is not None and memo[0] is cache.config:
            return memo[1]
        ttl = cache._ttl(self.ttl)
        fresh = (
            Freshness(None)
            if ttl is None
            else Freshness(ttl, self.stale_ttl, self.refresh_ahead, self.beta)
        )
        self._fresh = (cache.config, fresh)
        return fresh


def bypass(opt: with_cache | None, cache: Cache, reason: str) -> None:
    cache.stats.incr("query.bypass")
    if opt is not None and opt.strict:
        raise NotCacheable(reason)
    log.debug("sa_cache: not caching: %s", reason)


def option_of(state: Any) -> with_cache | None:
    """The `with_cache` option of this execution, if it is one we may serve."""
    statement: Any = state.statement
    option = find_option(statement._with_options)  # the common case, cheaply
    if option is None and getattr(statement, "_memoized_select_entities", None):
        # options given before with_only_columns() / with_entities() (SQLAlchemy 2.1)
        option = find_option(state.user_defined_options)
    if option is None:
        return None
    if state.lazy_loaded_from is not None and not option.relationships:
        return None
    return option


def find_option(options: Any) -> with_cache | None:
    for option in options:
        if isinstance(option, with_cache):
            return option
    return None
