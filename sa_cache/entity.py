"""The entity cache: ``cache.register(Model)``, primary-key reads served from it, and
write-through of committed rows.

An entry holds one row's column values (as Python values, after type processing), so
a hit builds the object directly and registers it in the identity map the way the
ORM's own loading does — no SQL, no connection, no merge.

Writes (write-through after the outermost commit) are in `entity_writes`.

Fills after a miss are guarded: the reader first puts a lease marker in the
entry (only if it is empty), loads the row, then swaps marker for row with a
compare-and-set; a commit in between replaced or deleted the marker, so the stale
fill fails (DESIGN rule 3).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import inspect
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.attributes import instance_dict, instance_state

from .access_stats import record_entity
from .backends.base import NO_VALUE, NoValue
from .direct import register_enums, single_entity_result
from .entity_plan import EntityPlan
from .invalidation import rows_generation, table_name
from .keys import digest
from .transaction import collector_for, sees_own_writes

if TYPE_CHECKING:
    from .cache import Cache

_single_entity_result = single_entity_result  # the name write_behind_session imports

WRITE_MODES = ("through", "invalidate", "behind")
LEASE_PREFIX = b"sac-lease:"
MARKER_PREFIX = b"sac-"
"""Lease markers and tombstones (`cache_invalidation.TOMBSTONE_PREFIX`) start with it;
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
        "_keys", "attr_keys", "columns", "expressions", "mapper", "pk_positions", "table", "ttl",
        "write",
    )  # fmt: skip

    def __init__(self, mapper: Mapper[Any], ttl: float | None, write: str) -> None:
        # (key builder, primary key, identity token) -> entry key, for rows read or written
        self._keys: dict[tuple[Any, ...], str] = {}
        self.mapper = mapper
        self.ttl = ttl
        self.write = write
        self.table = table_name(mapper.local_table)
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

    def fits(self, values: Any) -> bool:
        """Is ``values`` (a decoded entry) a row image of this model? An entry of another
        shape (a foreign or corrupt one) is a counted miss, never an exception (rule 7)."""
        return type(values) is list and len(values) == len(self.attr_keys)

    def gen_keys(self, cache: Cache) -> tuple[str, ...]:
        """Generations an entry of this model is valid under: namespace-wide and rows."""
        return cache.generation_keys([rows_generation(self.table)])

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
        text = repr(tuple(pk)) if identity_token is None else repr((identity_token, *pk))
        if len(text) > 200:
            text = "#" + digest(text)
        if self.write == "behind":  # in its queue partition's hash slot (see write_behind)
            from .write_behind import partition_tag

            text = partition_tag(cache, self.table, text) + text
        return cache.keys.entity(self.table, text)


def register(
    cache: Cache, model: Any, ttl: float | None = None, write: str = "through"
) -> EntitySpec:
    """Validate and record ``model`` in ``cache.entities``; see `Cache.register`."""
    if write not in WRITE_MODES:
        raise ValueError(f"write must be one of {', '.join(WRITE_MODES)}, got {write!r}")
    if ttl is not None and (not isinstance(ttl, (int, float)) or ttl <= 0):
        raise ValueError(f"ttl must be positive seconds or None, got {ttl!r}")
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
    spec = EntitySpec(mapper, ttl, write)
    if write == "behind":
        from .write_behind_session import check_model

        check_model(cache, spec)
    existing: EntitySpec | None = cache.entities.get(mapper)
    if existing is not None:
        if existing.settings() != spec.settings():
            raise ValueError(
                f"{model.__name__} is already registered with ttl={existing.ttl!r}, "
                f"write={existing.write!r}"
            )
        return existing
    for other in cache.entities.values():  # (subclasses were refused above)
        if other.table == spec.table:
            raise ValueError(
                f"{model.__name__} and {other.mapper.class_.__name__} are both mapped to "
                f"table {spec.table!r}: entries are keyed by table and primary key, so only "
                "one class of a table can be registered"
            )
    register_enums(mapper)
    cache.entities[mapper] = spec
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


PREFETCH = "sa_cache.prefetched"
"""``session.info`` key: what `fast_get` read for a key it could not serve (a miss)."""


def _load_listeners(session: Session, spec: EntitySpec) -> bool:
    """Are there ``load`` (the model's) or ``loaded_as_persistent`` (the Session's)
    listeners, which only a database load runs?"""
    return bool(spec.mapper.class_manager.dispatch.load or session.dispatch.loaded_as_persistent)


def fast_get(
    cache: Cache, session: Session, model: Any, ident: Any, identity_token: Any = None
) -> Any:
    """``session.get`` of a registered model straight from its entry, without building a
    SELECT; `NO_VALUE` when the ordinary path must answer (not registered, already in
    the identity map, own uncommitted writes, this transaction's own write-behind
    change, load events, a miss). A queued write-behind image is served as the row."""
    mapper = getattr(model, "__mapper__", None)
    spec: EntitySpec | None = cache.entities.get(mapper) if mapper is not None else None
    if spec is None or _load_listeners(session, spec):
        return NO_VALUE  # (`serve` decides: only queued images skip those listeners)
    if len(session.dispatch.do_orm_execute) != 1:
        return NO_VALUE  # a listener besides ours (a global filter, say) must see the load
    if isinstance(ident, dict):
        try:
            pk = [ident[p.key] for p in spec.mapper._identity_key_props]
        except KeyError:
            return NO_VALUE
    else:
        pk = list(ident) if isinstance(ident, (tuple, list)) else [ident]
    if len(pk) != len(spec.pk_positions) or any(v is None for v in pk):
        return NO_VALUE  # the ordinary path raises the right error
    identity_key = spec.mapper.identity_key_from_primary_key(tuple(pk), identity_token)
    if identity_key in session.identity_map:
        return NO_VALUE  # Session.get answers from the identity map itself
    if session.autoflush:
        session._autoflush()
    if sees_own_writes(session, cache, (spec.table, rows_generation(spec.table))):
        return NO_VALUE
    key = spec.key(cache, pk, identity_token)
    behind = spec.write == "behind"
    collector = collector_for(session, cache) if behind else None
    if collector is not None and collector.behind_for(key) is not None:
        return NO_VALUE  # this transaction's own queued change: serve() answers it
    record_entity(cache, spec.table, pk, identity_token)
    gen_keys = spec.gen_keys(cache)
    raw, *gen_raws = cache.fetch([key, *gen_keys])
    gens = cache.ensure_generations(gen_keys, gen_raws)
    if raw is not NO_VALUE and not raw.startswith(MARKER_PREFIX):
        env = cache.unpack(raw)
        queued = env is not NO_VALUE and env.meta is not None and "wb" in env.meta
        if behind and queued and env.value is None:
            cache.stats.incr("entity.hit")
            return None  # a queued delete
        if (
            env is not NO_VALUE
            and ((behind and queued) or (env.gens == gens and not queued))
            and spec.fits(env.value)  # else serve() counts it
        ):
            obj = build(session, spec, env.value, identity_token, queued)
            if obj is not None:
                cache.stats.incr("entity.hit")
                if collector is not None:  # updates merge over it (write_behind_merge)
                    collector.behind_seen[key] = raw
                return obj
    session.info[PREFETCH] = (key, raw, gens)  # the miss path need not read it again
    return NO_VALUE


def serve(
    cache: Cache,
    state: Any,
    plan: EntityPlan,
    params: dict[str, Any],
    load: Callable[[], Any],
) -> Any:
    """Answer a primary-key lookup from the entity entry, or load it and fill the entry."""
    session: Session = state.session
    spec = plan.spec
    identity_token = state.load_options._identity_token or state.bind_arguments.get(
        "identity_token"
    )
    pk = [params[k] for k in plan.bind_keys]
    key = spec.key(cache, pk, identity_token)
    prefetched = session.info.pop(PREFETCH, None)
    if prefetched is None or prefetched[0] != key:
        prefetched = None
        record_entity(cache, spec.table, pk, identity_token)  # fast_get did, if it read
    if spec.write == "behind":  # this transaction's own write-behind change comes first
        change = collector_for(session, cache).behind_for(key)
        if change is not None:
            image = change.image
            found = [] if image is None else [build(session, spec, image, identity_token, True)]
            return single_entity_result(spec.mapper, found)
    gen_keys = spec.gen_keys(cache)
    if prefetched is not None:
        _, raw, gens = prefetched
    else:
        raw, *gen_raws = cache.fetch([key, *gen_keys])
        gens = cache.ensure_generations(gen_keys, gen_raws)
    if raw is not NO_VALUE and not raw.startswith(MARKER_PREFIX):
        env = cache.unpack(raw)
        # A queued write-behind image is the row until the database has it.
        queued = env is not NO_VALUE and env.meta is not None and "wb" in env.meta
        if queued and env.value is None:
            cache.stats.incr("entity.hit")
            return single_entity_result(spec.mapper, [])
        if env is not NO_VALUE and not spec.fits(env.value):
            cache.stats.incr("entity.foreign")  # a miss: the fill replaces it
        elif (
            env is not NO_VALUE
            and (queued or env.gens == gens)
            # load / loaded_as_persistent listeners see database loads; a queued image
            # is served all the same (the database does not have it yet)
            and (queued or not _load_listeners(session, spec))
        ):
            obj = build(session, spec, env.value, identity_token, queued)
            if obj is not None:
                cache.stats.incr("entity.hit")
                if spec.write == "behind":  # updates merge over it (write_behind_merge)
                    collector_for(session, cache).behind_seen[key] = raw
                return single_entity_result(spec.mapper, [obj])
    cache.stats.incr("entity.miss")
    identity_key = spec.mapper.identity_key_from_primary_key(tuple(pk), identity_token)
    return _load_and_fill(cache, state, spec, key, raw, gens, identity_key, load)


def _load_and_fill(
    cache: Cache,
    state: Any,
    spec: EntitySpec,
    key: str,
    raw: bytes | NoValue,
    gens: tuple[str, ...] | None,
    identity_key: Any,
    load: Callable[[], Any],
) -> Any:
    """Load from the database; store the row if nothing changed it meanwhile."""
    session: Session = state.session
    lease: bytes | None = None
    # Take the slot: empty, a stale entry or a tombstone — never another reader's live lease.
    expected = None if raw is NO_VALUE or raw.startswith(LEASE_PREFIX) else raw
    if gens is not None and (raw is NO_VALUE or expected is not None):
        token = LEASE_PREFIX + secrets.token_hex(8).encode()
        if cache._call(lambda: cache.backend.cas(key, expected, token, LEASE_TTL), False, "lease"):
            lease = token
    present = identity_key in session.identity_map  # such an object is not a fresh load
    box, result = load()
    objects = result.unique().scalars().all()
    fresh = [] if present else [o for o in objects if not instance_state(o).modified]
    if lease is None:
        return single_entity_result(spec.mapper, list(objects))
    packed: bytes | None = None
    ttl = cache._ttl(spec.ttl)
    if gens is not None and box.fill_allowed(gens) and len(fresh) == 1:
        image = column_image(spec, fresh[0])  # now: the caller may change the object
        if image is not None and key != spec.key(
            cache, [image[i] for i in spec.pk_positions], identity_key[2]
        ):
            # Looked up by a value the database finds equal to the row's key but spelled
            # otherwise (1.0 for 1, "de" for "DE"): writes update the row's own key only.
            cache.stats.incr("entity.fill_skipped")
            image = None
        if image is not None:
            try:
                packed = cache.pack(image, ttl, gens)
            except TypeError:
                packed = None
    held = lease

    def swap() -> None:
        """Lease for row, or give the slot back (no row, or the swap lost)."""
        if packed is not None and cache._call(
            lambda: cache.backend.cas(key, held, packed, ttl), False, "fill"
        ):
            cache.stats.incr("entity.fill")
            return
        cache._call(lambda: cache.backend.cas(key, held, None), False, "lease")

    if not cache.fill_later(swap):  # off the request path (see Cache.fill_later)
        swap()
    return single_entity_result(spec.mapper, list(objects))


def column_image(spec: EntitySpec, obj: Any, inserted: bool = False) -> list[Any] | None:
    """The full column image of a loaded or flushed object; None if a value is unknown.

    A column missing from a just-inserted object was left to the database: it is NULL
    unless the database computes it (server default, ``FetchedValue``, ``Computed``),
    which we cannot know without a SELECT, so the row is invalidated instead.
    """
    dict_ = instance_dict(obj)
    image: list[Any] = []
    for key, column in zip(spec.attr_keys, spec.columns, strict=True):
        if key in dict_:
            image.append(dict_[key])
        elif inserted and column.server_default is None and column.default is None:
            image.append(None)
        else:
            return None
    return image
