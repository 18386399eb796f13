"""The worker's bisection of a failed write-behind batch around rows deleted early.

A row deleted and added again whose delete sets off foreign-key actions is deleted
before the batch's other images (`write_behind_order.early_deletes`). When the worker
bisects a failed batch (`write_behind_batches`), such a row goes before the rows its
delete could reach (`bisection_order`): applied after them, in a later transaction, its
delete would cascade away rows the batch had just written. While it fails, the images
of the tables its delete can reach wait for its retry (`hold_back`, `not_held`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .write_behind_order import (
    delete_acts,
    dependency_order,
    foreign_links,
    parent_layers,
    reaching_tables,
)

if TYPE_CHECKING:
    from .write_behind_coalesce import Partition, Slot


def renewed_root(slot: Slot) -> bool:
    """Is ``slot`` a row deleted and added again whose delete is applied early (it sets
    off foreign-key actions)?"""
    return (
        slot.renewed and slot.image is not None and slot.spec is not None and delete_acts(slot.spec)
    )


def bisection_order(items: list[tuple[Partition, Slot]]) -> list[tuple[Partition, Slot]]:
    """``items`` with the rows deleted early (`renewed_root`) first, parents first
    (tables in foreign-key order, then `parent_layers`), the others after them as they
    were: a bisection of the batch then applies such a row in the same transaction as
    the rows its early delete can reach, or in an earlier one — never after them (its
    delete would cascade away what they wrote). ``items`` as given when none is."""
    roots = [(p, s) for p, s in items if renewed_root(s)]
    if not roots:
        return items
    by_spec: dict[Any, list[tuple[Partition, Slot]]] = {}
    for item in roots:
        by_spec.setdefault(item[1].spec, []).append(item)
    first = [
        item
        for spec in dependency_order(list(by_spec))
        for layer in parent_layers(spec, by_spec[spec], lambda item: item[1].image)
        for item in layer
    ]
    chosen = {id(s) for _, s in roots}
    return first + [(p, s) for p, s in items if id(s) not in chosen]


def hold_back(held: dict[Any, float], slot: Slot, soonest: float) -> None:
    """``slot`` failed and stays to be retried: if it is a row deleted early
    (`renewed_root`), the images of the tables its delete can reach wait for it (in
    ``held``: table -> until when, monotonic clock), uncounted, until its retry (at
    least until ``soonest``) — applied before it, its delete would cascade them away
    (or set NULL in them)."""
    if not renewed_root(slot):
        return
    assert slot.spec is not None
    until = max(slot.not_before, soonest)
    for table in reaching_tables(slot.spec.mapper.local_table):
        held[table] = max(until, held.get(table, 0.0))


def not_held(held: dict[Any, float], items: list[tuple[Partition, Slot]]) -> list[Any]:
    """``items`` but the images `hold_back` holds in ``held``: those wait until then —
    not an image that refers to no row (a row moved away from the failed one, which
    may be what its delete waits for): no delete can reach it."""
    if not held:
        return items
    out = []
    for part, slot in items:
        until = held.get(slot.spec.mapper.local_table) if slot.spec is not None else None
        if until is None or slot.image is None or _refers_to_nothing(slot):
            out.append((part, slot))
        else:
            slot.not_before = max(slot.not_before, until)
    return out


def _refers_to_nothing(slot: Slot) -> bool:
    """Does ``slot``'s image write NULL to every foreign key of its table?"""
    links = foreign_links(slot.spec) if slot.spec is not None and slot.image is not None else None
    if not links or slot.image is None:
        return False
    image, cols = slot.image, slot.cols  # (a column not written keeps the row's value)
    return all(image[i] is None and (cols is None or i in cols) for _, _, at in links for i in at)
