"""Recognising primary-key lookups of registered models: ``select(Model).where(pk == v)``
with the whole primary key and nothing else, which the entity cache can answer."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import inspect
from sqlalchemy.sql import elements, operators

from .direct import only_cache_options, selected_entity

if TYPE_CHECKING:
    from .cache import Cache
    from .entity import EntitySpec


class EntityPlan:
    """A statement shape that selects one registered entity by its full primary key
    (with a LIMIT, as ``first()`` adds: then a lookup only while it admits a row)."""

    __slots__ = ("bind_keys", "limit_key", "spec")

    def __init__(
        self, spec: EntitySpec, bind_keys: tuple[str, ...], limit_key: str | None = None
    ) -> None:
        self.spec = spec
        self.bind_keys = bind_keys  # bind parameter name per primary-key column
        self.limit_key = limit_key  # the LIMIT's bind parameter name, if it has one

    def admits(self, params: dict[str, Any]) -> bool:
        """Is this execution (``params``: its bind values) a lookup? Not under LIMIT 0."""
        if self.limit_key is None:
            return True
        limit = params.get(self.limit_key)
        return type(limit) is int and limit >= 1


def plan_for(cache: Cache, compiled: Any) -> EntityPlan | None:
    """An `EntityPlan` when the compiled statement is ``select(Model).where(pk == v, ...)``.

    Bind names are the compiled statement's, i.e. the keys of its ``construct_params``.
    """
    statement = compiled.statement
    if not cache.entities or not isinstance(statement, sa.Select):
        return None
    entity = selected_entity(statement)
    if entity is None:
        return None
    spec: EntitySpec | None = cache.entities.get(inspect(entity).mapper)
    if spec is None or (spec.eager_default and spec.write != "behind"):
        # Eager loaders of the mapping: the database load runs them. (Write-behind
        # models still come here: their queued images are the rows, see `serve`.)
        return None
    if not _plain(statement) or not only_cache_options(statement):
        return None
    limit_key = None
    if statement._limit_clause is not None:  # ``first()``: a row or none, as without it
        limit_key = compiled.bind_names.get(statement._limit_clause)
        if limit_key is None:
            return None
    binds: dict[Any, str] = {}
    for criterion in _conjuncts(statement._where_criteria):
        if not isinstance(criterion, elements.BinaryExpression):
            return None
        if criterion.operator is not operators.eq and criterion.operator is not operator.eq:
            return None
        left, right = criterion.left, criterion.right
        if isinstance(left, elements.BindParameter):
            left, right = right, left
        if not isinstance(right, elements.BindParameter) or not isinstance(left, sa.Column):
            return None
        if left.table is not spec.mapper.local_table or not left.primary_key or left in binds:
            return None
        name = compiled.bind_names.get(right)
        if name is None:
            return None
        binds[left] = name
    if set(binds) != set(spec.mapper.primary_key):
        return None
    return EntityPlan(spec, tuple(binds[c] for c in spec.mapper.primary_key), limit_key)


_EXTRA_CLAUSES = (
    "_fetch_clause", "_offset_clause", "_for_update_arg",
    "_pre_columns_clause", "_post_select_clause", "_post_criteria_clause", "_post_body_clause",
)  # fmt: skip
"""Clauses of a Select (those of SQLAlchemy 2.1 included) that are None when not used."""
_EXTRA_COLLECTIONS = (
    "_from_obj", "_setup_joins", "_memoized_select_entities", "_group_by_clauses",
    "_having_criteria", "_distinct_on", "_independent_ctes", "_prefixes", "_suffixes",
    "_hints", "_statement_hints",
)  # fmt: skip
"""Parts of a Select that are empty when not used."""


def _plain(statement: Any) -> bool:
    """Has ``statement`` nothing but its columns, WHERE, ORDER BY and LIMIT (see
    `EntityPlan.admits`)? Anything else (a FROM or join of its own, OFFSET / FETCH,
    GROUP BY / HAVING, DISTINCT, a CTE, hints, prefixes, ...) can exclude the row or run
    other SQL: no entity lookup then."""
    if statement._distinct:
        return False
    for name in _EXTRA_CLAUSES:
        if getattr(statement, name, None) is not None:
            return False
    return not any(getattr(statement, name, None) for name in _EXTRA_COLLECTIONS)


def _conjuncts(criteria: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for c in criteria:
        if isinstance(c, elements.BooleanClauseList) and c.operator is operators.and_:
            out.extend(_conjuncts(c.clauses))
        else:
            out.append(c)
    return out
