"""A write-behind row deleted and added again in one transaction (renewed) whose delete
sets off foreign-key actions.

The worker deletes such a row before writing it again, so that its ON DELETE actions
run (`write_behind_order`) — but later than the COMMIT, and workers apply partitions
independently: the worker of another partition may first write a row that delete
reaches, added under the new row by the same transaction or a later one, and the
cascade takes it with it (committed, gone, no dead letter). Such a transaction is
written to the database in its own COMMIT instead, as when Redis is down: its
actions run there, in the application's order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import sessionmaker
from test_write_behind import FAST, cleanup
from test_write_behind_apply_order import Node, OBase, Person, _foreign_keys_on

import sa_cache
from sa_cache.write_behind import write_behind_for
from sa_cache.write_behind_leases import Leases
from sa_cache.write_behind_worker import WriteBehindWorker

PARTITIONS = 8


class Env:
    def __init__(self, engine: sa.Engine, cache: sa_cache.Cache) -> None:
        self.engine, self.cache = engine, cache
        self.Session = sessionmaker(
            engine, class_=sa_cache.CachingSession, cache=cache, expire_on_commit=False
        )

    def drain(self) -> WriteBehindWorker:
        config = {**FAST, "max_attempts": 3, "foreign_key_wait": 0.0}
        runner = WriteBehindWorker(self.cache, self.engine, **config)
        runner.run(drain=True)
        return runner

    def nodes(self) -> list[Any]:
        with self.engine.connect() as conn:
            query = sa.select(Node.id, Node.parent_id, Node.name).order_by(Node.id)
            return [tuple(r) for r in conn.execute(query)]

    def people(self) -> list[Any]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.select(Person.id, Person.email))]

    def partition(self, pk: int) -> int:
        spec = self.cache.entities[sa.inspect(Node)]
        return write_behind_for(self.cache).partition_of(spec.table, repr((pk,)))


@pytest.fixture
def env(engine: sa.Engine, redis_url: str, namespace: str) -> Iterator[Env]:
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _foreign_keys_on)
        engine.dispose()
    OBase.metadata.drop_all(engine)
    OBase.metadata.create_all(engine)
    cache = sa_cache.Cache.from_url(redis_url, namespace=namespace)
    write_behind_for(cache).configure(partitions=PARTITIONS)
    cache.register(Node, ttl=60, write="behind")
    cache.register(Person, ttl=60, write="behind")
    try:
        yield Env(engine, cache)
    finally:
        cache.close()
        cleanup(redis_url, namespace, engine)
        OBase.metadata.drop_all(engine)


def _other_partition(env: Env, parent: int) -> int:
    """A node id in another partition than node ``parent``'s."""
    return next(
        i for i in range(parent + 1, parent + 100) if env.partition(i) != env.partition(parent)
    )


def test_a_new_child_of_a_renewed_parent_in_another_partition_survives(env: Env) -> None:
    """Node 1 (ON DELETE CASCADE children) with old child 2; one transaction deletes node
    1 and adds it again with a new child, in another partition. The child's partition is
    applied first (the parent's is held by another worker's lease meanwhile)."""
    child = _other_partition(env, 1)
    with env.Session() as s:
        s.add(Node(id=1, name="old1"))
        s.flush()
        s.add(Node(id=_other_partition(env, child), parent_id=1, name="old child"))
        s.commit()
    assert env.drain().dead == 0
    old_child = env.nodes()[1][0]
    with env.Session() as s:
        s.connection()  # (database work in the transaction: the usual two-step commit)
        s.delete(s.get(Node, 1))
        s.flush()
        s.add(Node(id=1, name="new1"))
        s.flush()
        s.add(Node(id=child, parent_id=1, name="new child"))
        s.commit()
    assert env.nodes() == [(1, None, "new1"), (child, 1, "new child")]  # written at once
    blocker = Leases(write_behind_for(env.cache), "another-worker", 30.0)
    assert blocker.acquire(env.partition(1))  # the parent's partition: not yet
    try:
        assert env.drain().dead == 0
    finally:
        blocker.release(env.partition(1))
    assert env.drain().dead == 0
    assert env.nodes() == [(1, None, "new1"), (child, 1, "new child")]  # (old child: cascaded)
    assert old_child not in {row[0] for row in env.nodes()}
    with env.Session() as s:  # and the entries say so
        assert s.get(Node, child) is not None
        assert s.get(Node, old_child) is None


def test_a_child_added_later_under_a_renewed_parent_in_another_partition_survives(
    env: Env,
) -> None:
    """The renewal alone in its transaction; a later transaction adds a child under the
    new node 1, in another partition, whose worker runs first."""
    child = _other_partition(env, 1)
    with env.Session() as s:
        s.add(Node(id=1, name="old1"))
        s.commit()
    assert env.drain().dead == 0
    with env.Session() as s:
        s.connection()
        s.delete(s.get(Node, 1))
        s.flush()
        s.add(Node(id=1, name="new1"))
        s.commit()
    with env.Session() as s:
        s.connection()
        s.add(Node(id=child, parent_id=1, name="later child"))
        s.commit()
    blocker = Leases(write_behind_for(env.cache), "another-worker", 30.0)
    assert blocker.acquire(env.partition(1))
    try:
        assert env.drain().dead == 0
    finally:
        blocker.release(env.partition(1))
    assert env.drain().dead == 0
    assert env.nodes() == [(1, None, "new1"), (child, 1, "later child")]


def test_a_renewal_without_foreign_key_actions_is_queued(env: Env) -> None:
    """Only a delete that sets off actions needs its COMMIT: a row of a table nothing
    refers to with ON DELETE actions (a Person) renewed is queued as usual."""
    with env.Session() as s:
        s.add(Person(id=1, email="a@x"))
        s.commit()
    assert env.drain().dead == 0
    with env.Session() as s:
        s.connection()
        s.delete(s.get(Person, 1))
        s.flush()
        s.add(Person(id=1, email="b@x"))
        s.commit()
    assert env.people() == [(1, "a@x")]  # queued: the database trails
    assert env.drain().dead == 0
    assert env.people() == [(1, "b@x")]
