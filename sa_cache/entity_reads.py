"""Primary-key reads served from the entity cache: `fast_get` (``CachingSession.get``
without building a SELECT) and `serve` (the execute hook's primary-key selects, and
``session.get`` through the ORM). A hit builds the object directly (`entity.build`);
a miss loads the row and fills the entry with a guarded write: a lease marker first
(only if the entry is empty), then a compare-and-set of marker for row, which a
commit in between makes fail (DESIGN rule 3)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import instance_state

from .access_stats import record_entity
from .backends.base import NO_VALUE, NoValue
from .direct import single_entity_result
from .entity import LEASE_PREFIX, LEASE_TTL, MARKER_PREFIX, EntitySpec, build, column_image
from .entity_plan import EntityPlan
from .tokens import older_than
from .transaction import collector_for
from .visibility import sees_own_writes, snapshot_of

if TYPE_CHECKING:
    from .cache import Cache


PREFETCH = "sa_cache.prefetched"
"""``session.info`` key: what `fast_get` read for a key it could not serve (a miss)."""


def _load_listeners(session: Session, spec: EntitySpec, refresh: bool = True) -> bool:
    """Are there ``load`` or (with ``refresh``: a read that may refresh an object the
    Session holds) ``refresh`` listeners of the model, or ``loaded_as_persistent`` ones
    of the Session, which only a database load runs?"""
    dispatch = spec.mapper.class_manager.dispatch
    return bool(
        dispatch.load or (refresh and dispatch.refresh) or session.dispatch.loaded_as_persistent
    )


def fast_get(
    cache: Cache, session: Session, model: Any, ident: Any, identity_token: Any = None
) -> Any:
    """``session.get`` of a registered model straight from its entry, without building a
    SELECT; `NO_VALUE` when the ordinary path must answer (not registered, already in
    the identity map, own uncommitted writes, this transaction's own write-behind
    change, load events, a miss). A queued write-behind image is served as the row."""
    mapper = getattr(model, "__mapper__", None)
    spec: EntitySpec | None = cache.entities.get(mapper) if mapper is not None else None
    # (an object the Session holds is returned as it is: nothing to refresh)
    if spec is None or _load_listeners(session, spec, refresh=False) or spec.eager_default:
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
    if sees_own_writes(session, cache, spec.own_tables):
        return NO_VALUE
    key = spec.key(cache, pk, identity_token)
    behind = spec.write == "behind"
    collector = collector_for(session, cache) if behind else None
    if collector is not None and collector.behind_for(key) is not None:
        return NO_VALUE  # this transaction's own queued change: serve() answers it
    record_entity(cache, spec.table, pk, identity_token)
    raw, read = _read(cache, spec, key)
    gens = _entry_gens(spec, read)
    if raw is not NO_VALUE and not raw.startswith(MARKER_PREFIX):
        env = cache.unpack(raw)
        queued = env is not NO_VALUE and env.meta is not None and "wb" in env.meta
        if behind and queued and env.value is None:
            cache.stats.incr("entity.hit")
            return None  # a queued delete
        if (
            env is not NO_VALUE
            and (
                (behind and queued)
                or (env.gens == gens and not queued and _in_snapshot(session, read))
            )
            and spec.fits(env.value)  # else serve() counts it
        ):
            obj = build(session, spec, env.value, identity_token, queued)
            if obj is not None:
                cache.stats.incr("entity.hit")
                if collector is not None:  # updates merge over it (write_behind_merge)
                    collector.behind_seen[key] = raw
                return obj
    session.info[PREFETCH] = (key, raw, read)  # the miss path need not read it again
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
    if prefetched is not None:
        _, raw, read = prefetched
    else:
        raw, read = _read(cache, spec, key)
    gens = _entry_gens(spec, read)
    current = False  # a valid entry of the current generations this reader cannot use
    if raw is not NO_VALUE and not raw.startswith(MARKER_PREFIX):
        env = cache.unpack(raw)
        # A queued write-behind image is the row until the database has it.
        queued = env is not NO_VALUE and env.meta is not None and "wb" in env.meta
        if queued and env.value is None:
            cache.stats.incr("entity.hit")
            return single_entity_result(spec.mapper, [])
        if env is not NO_VALUE and not spec.fits(env.value):
            cache.stats.incr("entity.foreign")  # a miss: the fill replaces it
        elif queued or (env is not NO_VALUE and env.gens == gens):
            # load / loaded_as_persistent listeners, and the mapping's eager loaders,
            # see database loads; a queued image is served all the same (the database
            # does not have it yet)
            if queued or (
                _in_snapshot(session, read)
                and not (spec.eager_default or _load_listeners(session, spec))
            ):
                obj = build(session, spec, env.value, identity_token, queued)
                if obj is not None:
                    cache.stats.incr("entity.hit")
                    if spec.write == "behind":  # updates merge over it (write_behind_merge)
                        collector_for(session, cache).behind_seen[key] = raw
                    return single_entity_result(spec.mapper, [obj])
            current = not queued
    cache.stats.incr("entity.miss")
    identity_key = spec.mapper.identity_key_from_primary_key(tuple(pk), identity_token)
    return _load_and_fill(cache, state, spec, key, raw, read, identity_key, load, current)


def _in_snapshot(session: Session, read: tuple[str, ...] | None) -> bool:
    """May an entry valid under the generations ``read`` be served to this Session? Not
    to a transaction reading an older REPEATABLE READ snapshot, if a commit wrote the
    table after it: its database reads would not see that row yet."""
    snapshot = snapshot_of(session)  # (None under READ COMMITTED)
    return snapshot is None or (read is not None and older_than(read, snapshot))


_read_keys: dict[tuple[EntitySpec, Any], tuple[str, ...]] = {}


def _read(
    cache: Cache, spec: EntitySpec, key: str
) -> tuple[bytes | NoValue, tuple[str, ...] | None]:
    """The entry ``key`` and, in the same round trip, the generations it is valid under
    (`EntitySpec.gen_keys`) followed by the table's own (`EntitySpec.watched`), which a
    load from an older snapshot is checked against (`_load_and_fill`); None: the store
    cannot say."""
    memo = (spec, cache.keys)  # (a key version has a key builder of its own)
    gen_keys = _read_keys.get(memo)
    if gen_keys is None:
        if len(_read_keys) > 256:
            _read_keys.clear()
        gen_keys = _read_keys[memo] = (
            *spec.gen_keys(cache),
            *(cache.keys.generation(t) for t in spec.watched),
        )
    raw, *gen_raws = cache.fetch([key, *gen_keys])
    return raw, cache.ensure_generations(gen_keys, gen_raws)


def _entry_gens(spec: EntitySpec, read: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """Of what `_read` read, the generations an entry is valid under."""
    return None if read is None else read[: -len(spec.watched)]


def _queued(cache: Cache, raw: bytes) -> bool:
    """Is ``raw`` a queued write-behind change (`write_behind_records.queued_entry`)?"""
    env = cache.unpack(raw)
    return env is not NO_VALUE and env.meta is not None and "wb" in env.meta


def _load_and_fill(
    cache: Cache,
    state: Any,
    spec: EntitySpec,
    key: str,
    raw: bytes | NoValue,
    read: tuple[str, ...] | None,
    identity_key: Any,
    load: Callable[[], Any],
    current: bool = False,
) -> Any:
    """Load from the database; store the row if nothing changed it meanwhile.
    ``read``: the generations read with the entry (`_read`). ``current``: the entry is
    valid under the current generations, only not for this reader (a REPEATABLE READ
    snapshot older than the table's last write, load listeners, an object to refresh):
    it is left alone for the others — a lease would take it away, and a load this
    reader may not store (an older snapshot's) would then delete it."""
    gens = _entry_gens(spec, read)
    session: Session = state.session
    lease: bytes | None = None
    # Take the slot: empty, a stale entry or a tombstone — never a current entry, nor
    # another reader's live lease, nor a queued write-behind change it could not use (of
    # another shape: the queue, not the database, holds the row until the worker has
    # applied it).
    expected = None if raw is NO_VALUE or raw.startswith(LEASE_PREFIX) else raw
    queued = expected is not None and _queued(cache, expected)
    free = raw is NO_VALUE or expected is not None
    if gens is not None and not current and not queued and free:
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
    # A load from an older snapshot (a later statement under REPEATABLE READ) is
    # stored only if no commit wrote the table since the snapshot: the table's own
    # generation counts too (an ordinary commit moves none an entity entry holds; the
    # one that tombstoned this entry bumped the table's in the same script).
    snapshot_ok = box.fill_ok or (read is not None and older_than(read, box.snapshot_clock))
    if gens is not None and snapshot_ok and len(fresh) == 1:
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

    if not cache.fill_later(swap, (key,)):  # off the request path (see Cache.fill_later)
        swap()
    return single_entity_result(spec.mapper, list(objects))
