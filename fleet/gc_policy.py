"""The garbage collector's settings for the fleet's long-running processes.

A worker or the customer-data server allocates a great many short-lived objects per turn (the
Agents SDK's items, pydantic models, request scopes), nearly all freed by reference counting
the moment they go out of use. CPython's cyclic collector still counts them: with its default
young-generation threshold (700 allocations) it runs a collection every few hundred objects,
and every so many of those an oldest-generation pass over the whole heap, most of which is
what start-up imported (torch, the SDK, pydantic's schemas) and will never be garbage.

So once a process is ready to serve, :func:`settle` moves everything alive into the permanent
generation (:func:`gc.freeze`: start-up objects are never scanned again) and raises the
young threshold, so a collection runs once per ``young_threshold`` allocations. Cycles are still
collected, later and in fewer, larger passes. ``FLEET_GC_YOUNG_THRESHOLD=0`` leaves Python's
defaults alone.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def settle(young_threshold: int) -> None:
    """Freeze what start-up built and collect the young generation every ``young_threshold``
    allocations (0: leave the collector as Python set it)."""
    if young_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)
    log.info(
        "garbage collector settled: %d start-up objects frozen, young generation collected "
        "every %d allocations", gc.get_freeze_count(), young_threshold,
    )
