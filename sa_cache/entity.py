"""The entity cache: ``cache.register(Model)``, primary-key reads served from it, and
write-through of committed rows.

An entry holds one row's column values (as Python values, after type processing), so
a hit builds the object directly and registers it in the identity map the way the
ORM's own loading does — no SQL, no connection, no merge.

Reads served from entries (``session.get``, primary-key selects, guarded fills after
a miss) are in `entity_reads`; writes (write-through after the outermost commit) in
`entity_writes`.
"""

from __future__ import annotations

import secrets
import threading
import uuid
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event, inspect
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.attributes import instance_dict, instance_state

from .direct import LAZY_STRATEGIES, register_enums
from .freshness import check_seconds
from .invalidation import rows_generation, table_name, watched
from .keys import digest, unkeyable

if TYPE_CHECKING:
    from .cache import Cache


WRITE_MODES = ("through", "invalidate", "behind")
LEASE_PREFIX = b"sac-lease:"
MARKER_PREFIX = b"sac-"
"""Lease markers and tombstones (`tokens.TOMBSTONE_PREFIX`) start with it;
rows never do."""
LEASE_TTL = 5.0
KEYS_KEPT = 10_000
"""Entry keys each registered model remembers (a row's key is a repr and a digest away)."""
_KEPT_TYPES = frozenset({int, str, uuid.UUID})
"""Primary-key value types whose keys are remembered: never equal to a value of another
type (unlike ``1 == 1.0 == True == Decimal(1)``, whose reprs differ)."""


class EntitySpec:
    """How one registered model is cached."""

    __slots__ = (
        "_eager", "_keys", "attr_keys", "aware_positions", "columns", "expressions", "mapper",
        "onupdate_keys", "onupdate_positions", "own_tables", "path", "pk_keys", "pk_positions",
        "positions", "table", "ttl", "watched", "write",
    )  # fmt: skip

    def __init__(self, mapper: Mapper[Any], ttl: float | None, write: str) -> None:
        # (key builder, primary key, identity token) -> entry key, for rows read or written
        self._keys: dict[tuple[Any, ...], str] = {}
        self._eager: tuple[int, bool] | None = None  # (mappers seen, `eager_default`)
        self.mapper = mapper
        self.path = mapper._path_registry  # the load path the ORM gives objects it loads
        self.ttl = ttl
        self.write = write
        self.table = table_name(mapper.local_table)
        # the table generations its entries follow (both spellings': see `watched`), and
        # what this Session's own writes must not have touched for one to be served
        self.watched = watched(self.table)
        self.own_tables = (*self.watched, *map(rows_generation, self.watched))
        # The image holds the table's own columns. A SQL expression (``column_property``
        # of a correlated count, say) is no column of the row: writes to other tables
        # change it, so it is never stored, and loads from the database on access.
        local = mapper.local_table.c
        stored = [p for p in mapper.column_attrs if local.contains_column(p.columns[0])]
        self.attr_keys = tuple(p.key for p in stored)
        self.columns = tuple(p.columns[0] for p in stored)
        self.expressions = frozenset(p.key for p in mapper.column_attrs) - set(self.attr_keys)
        by_column: dict[Any, str] = {p.columns[0]: p.key for p in stored}
        self.pk_positions = tuple(self.attr_keys.index(by_column[c]) for c in mapper.primary_key)
        self.positions = {key: i for i, key in enumerate(self.attr_keys)}
        # the attributes the mapper reads an object's primary key from (its identity key)
        self.pk_keys = tuple(mapper.get_property_by_column(c).key for c in mapper.primary_key)
        # ``DateTime(timezone=True)`` columns: given back in the connection's zone
        self.aware_positions = tuple(
            i
            for i, c in enumerate(self.columns)
            if isinstance(c.type, sa.DateTime) and c.type.timezone
        )
        # Columns an UPDATE sets from ``onupdate`` besides the changed ones: the flush puts
        # their values in the object without history (see `entity_writes`).
        self.onupdate_positions = tuple(
            i for i, c in enumerate(self.columns) if c.onupdate is not None
        )
        self.onupdate_keys = tuple(self.attr_keys[i] for i in self.onupdate_positions)

    def fits(self, values: Any) -> bool:
        """Is ``values`` (a decoded entry) a row image of this model? An entry of another
        shape (a foreign or corrupt one) is a counted miss, never an exception (rule 7)."""
        return type(values) is list and len(values) == len(self.attr_keys)

    @property
    def eager_default(self) -> bool:
        """Does a load of this model (or of a subclass) run eager loaders of its mapping
        (``relationship(lazy="selectin")``, ``"joined"``, ...)? Then primary-key reads go
        to the database, which runs them: an object built from an entry would leave
        those relationships to lazy loads that a closed Session cannot run."""
        mappers = list(self.mapper.self_and_descendants)
        memo = self._eager
        if memo is None or memo[0] != len(mappers):  # (a subclass mapped since)
            eager = any(r.lazy not in LAZY_STRATEGIES for m in mappers for r in m.relationships)
            memo = self._eager = (len(mappers), eager)
        return memo[1]

    def gen_keys(self, cache: Cache) -> tuple[str, ...]:
        """Generations an entry of this model is valid under: namespace-wide and rows
        (of each spelling of its table: an unqualified bulk write of a model declared
        with its schema moves the unqualified name's only)."""
        return cache.generation_keys([rows_generation(t) for t in self.watched])

    def settings(self) -> tuple[float | None, str]:
        return self.ttl, self.write

    def key(self, cache: Cache, pk: Sequence[Any], identity_token: Any = None) -> str:
        """The entry key of one row (remembered for the most recent `KEYS_KEPT` rows)."""
        if identity_token is not None and type(identity_token) is not str:
            return self._make_key(cache, pk, identity_token)
        for v in pk:
            if type(v) not in _KEPT_TYPES:
                return self._make_key(cache, pk, identity_token)
        # Of these types, equal values are of one type and have one repr: one key.
        memo = (cache.keys, identity_token, *pk)
        keys = self._keys
        found = keys.get(memo)
        if found is None:
            found = self._make_key(cache, pk, identity_token)
            if len(keys) >= KEYS_KEPT:
                keys.clear()
            keys[memo] = found
        return found

    def forget_keys(self) -> None:
        """Drop the remembered keys (the write-behind partitions changed)."""
        self._keys.clear()

    def _make_key(self, cache: Cache, pk: Sequence[Any], identity_token: Any) -> str:
        values = pk if identity_token is None else (identity_token, *pk)
        if unkeyable(values) is None:
            text = repr(tuple(values))
            if len(text) > 200:
                text = "#" + digest(text)
        else:  # a repr naming an address (`keys.unkeyable`): a key no other call makes,
            text = "!" + secrets.token_hex(16)  # so nothing stored under it is ever read
        if self.write == "behind":  # in its queue partition's hash slot (see write_behind)
            from .write_behind import partition_tag

            text = partition_tag(cache, self.table, text) + text
        return cache.keys.entity(self.table, text)


def _checked_mapper(model: Any, ttl: float | None, write: str) -> Mapper[Any]:
    """The mapper of ``model`` after the checks that need no configured mappers."""
    if write not in WRITE_MODES:
        raise ValueError(f"write must be one of {', '.join(WRITE_MODES)}, got {write!r}")
    if ttl is not None:
        check_seconds("ttl", ttl)
    try:
        mapper = inspect(model)
    except sa.exc.NoInspectionAvailable:
        raise TypeError(f"register() takes a mapped class, got {model!r}") from None
    if not isinstance(mapper, Mapper) or mapper.class_ is not model:
        raise TypeError(f"register() takes a mapped class, got {model!r}")
    if not mapper.primary_key:
        raise ValueError(f"{model.__name__} has no primary key; it cannot be cached by key")
    if mapper.inherits is not None or mapper.polymorphic_on is not None:
        raise ValueError(
            f"{model.__name__} uses inheritance/polymorphic loading, which the entity cache "
            "does not build directly yet; cache its queries with with_cache() instead"
        )
    if mapper.version_id_col is not None:
        raise ValueError(
            f"{model.__name__} has a version_id_col; the entity cache does not support it yet"
        )
    return mapper


_pending: weakref.WeakSet[Cache] = weakref.WeakSet()  # caches with deferred registrations
_pending_lock = threading.RLock()


def register_when_configured(cache: Cache, model: Any, ttl: float | None, write: str) -> None:
    """`register` for the class decorator. The class was just mapped; the classes its
    relationships name may not exist yet, so configuring the mappers now (which reading
    its attributes does) would fail — and leave SQLAlchemy's mappers failed for good.
    It is registered once they are configured: by SQLAlchemy (before any instance or
    query of it), or by the first look at ``cache.entities`` (`register_deferred`)."""
    mapper = _checked_mapper(model, ttl, write)
    if mapper.configured:
        register(cache, model, ttl, write)
        return
    with _pending_lock:
        if not event.contains(Mapper, "after_configured", _register_later):
            event.listen(Mapper, "after_configured", _register_later)
        cache._deferred.append((model, ttl, write))
        _pending.add(cache)


def _register_later() -> None:
    """``after_configured``: register the decorated classes whose mappers are ready."""
    with _pending_lock:
        caches = list(_pending)
    for cache in caches:
        register_deferred(cache)


def register_deferred(cache: Cache, configure: bool = False) -> None:
    """Register ``cache``'s decorated classes whose mappers are configured now (with
    ``configure``: configure them first). A class refused then raises here, and at every
    later look at ``cache.entities``: the application fails as loudly as an import
    error, never silently uncached."""
    if configure:  # their own registries only, as SQLAlchemy's first use of them would
        for registry in {
            id(r): r for r in (inspect(m).registry for m, *_ in cache._deferred)
        }.values():
            registry.configure(cascade=True)
    with _pending_lock:  # (another thread's look waits here while they are registered)
        # taken out at once: registering one may look at ``cache.entities`` (re-entrant)
        ready = [item for item in cache._deferred if inspect(item[0]).configured]
        cache._deferred[:] = [item for item in cache._deferred if item not in ready]
        cache._registering += 1
        try:
            for item in ready:
                try:
                    register(cache, *item)
                except Exception as exc:
                    cache._deferred_error = cache._deferred_error or exc
        finally:
            cache._registering -= 1
        if not cache._deferred:
            _pending.discard(cache)
    error = cache._deferred_error
    if error is not None:  # (a new one each time: the stored one's traceback would grow)
        raise RegistrationError(
            f"a class decorated with @cache.register was refused: {error}"
        ) from error.with_traceback(None)


class RegistrationError(ValueError):
    """A class decorated with ``@cache.register`` was refused once SQLAlchemy's mappers
    were configured (raised at every later look at ``cache.entities``)."""


def register(
    cache: Cache, model: Any, ttl: float | None = None, write: str = "through"
) -> EntitySpec:
    """Validate and record ``model`` in ``cache.entities``; see `Cache.register`.

    A plain base class is accepted though other mappers may write its table — its
    subclasses (which may be declared later) or a second class of the table: their
    flushes invalidate its entries (`entity_write_keys.foreign`)."""
    mapper = _checked_mapper(model, ttl, write)
    spec = EntitySpec(mapper, ttl, write)
    if write == "behind":
        from .write_behind_session import check_model

        check_model(cache, spec)
    existing: EntitySpec | None = cache._entities.get(mapper)
    if existing is not None:
        if existing.settings() != spec.settings():
            raise ValueError(
                f"{model.__name__} is already registered with ttl={existing.ttl!r}, "
                f"write={existing.write!r}"
            )
        return existing
    for other in cache._entities.values():  # (subclasses were refused above)
        if other.table == spec.table:
            raise ValueError(
                f"{model.__name__} and {other.mapper.class_.__name__} are both mapped to "
                f"table {spec.table!r}: entries are keyed by table and primary key, so only "
                "one class of a table can be registered"
            )
    register_enums(mapper)
    cache._entities[mapper] = spec
    return spec


# -- reads ------------------------------------------------------------------------------


def build(
    session: Session,
    spec: EntitySpec,
    values: Sequence[Any],
    identity_token: Any,
    fill_expired: bool = False,
) -> Any:
    """The object for a cached row: the one in the identity map, or a new persistent one.

    None when the identity map holds it with expired attributes (the database refreshes
    it), unless ``fill_expired``: then those attributes are set from ``values``.
    ``values`` must fit the model (`EntitySpec.fits`). A new object's expression
    attributes (`EntitySpec.expressions`) are expired: they load on first access.
    """
    mapper = spec.mapper
    pk = tuple(values[i] for i in spec.pk_positions)
    identity_key = mapper.identity_key_from_primary_key(pk, identity_token)
    identity_map = session.identity_map
    existing = identity_map.get(identity_key)
    if existing is not None:
        state = instance_state(existing)
        expired = state.expired_attributes
        if not expired or expired <= spec.expressions:
            return existing
        if not fill_expired:
            return None
        fill(state, spec, values)
        return existing
    instance = mapper.class_manager.new_instance()
    state = instance_state(instance)
    dict_ = instance_dict(instance)
    state.key = identity_key
    state.identity_token = identity_token
    state.session_id = session.hash_key
    # as the ORM's loading: this identity is the row's key as loads give it (the entry's
    # image holds it), which a write of the object can trust (`entity_write_keys.as_stored`)
    state.load_path = spec.path
    identity_map._add_unpresent(state, identity_key)
    for attr, value in zip(spec.attr_keys, values, strict=True):
        dict_[attr] = value
    if spec.expressions:
        state.expired_attributes.update(spec.expressions)
    return instance


def fill(state: Any, spec: EntitySpec, values: Sequence[Any]) -> None:
    """Set the expired or unloaded column attributes of ``state`` from a row image, as a
    refresh from the database would (attributes changed in the Session are kept)."""
    dict_ = state.dict
    expired, changed = state.expired_attributes, state.committed_state
    # as SQLAlchemy's own refresh: an expired attribute set since is not loaded over
    keys = [k for k in spec.attr_keys if k not in dict_ or (k in expired and k not in changed)]
    if len(keys) == len(values):
        for attr, value in zip(spec.attr_keys, values, strict=True):
            dict_[attr] = value
    else:
        wanted = set(keys)
        for attr, value in zip(spec.attr_keys, values, strict=True):
            if attr in wanted:
                dict_[attr] = value
    state._commit(dict_, keys)


def column_image(spec: EntitySpec, obj: Any, inserted: bool = False) -> list[Any] | None:
    """The full column image of a loaded or flushed object; None if a value is unknown.

    A column missing from a just-inserted object was left to the database: it is NULL
    unless the database computes it (server default, ``FetchedValue``, ``Computed``),
    which we cannot know without a SELECT, so the row is invalidated instead.
    """
    dict_ = instance_dict(obj)
    try:  # the common case: every value is there
        return [dict_[key] for key in spec.attr_keys]
    except KeyError:
        pass
    image: list[Any] = []
    for key, column in zip(spec.attr_keys, spec.columns, strict=True):
        if key in dict_:
            image.append(dict_[key])
        elif inserted and column.server_default is None and column.default is None:
            image.append(None)
        else:
            return None
    return image
