"""pgfleet: AI customer-support workers that run against PostgreSQL as their system of record."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Client", "Reply", "__version__"]

if TYPE_CHECKING:
    from fleet.client import Client, Reply


def __getattr__(name: str) -> object:
    # Lazy, so that `import fleet.settings` (and the CLI's --help) stays fast.
    if name in ("Client", "Reply"):
        from fleet import client

        return getattr(client, name)
    raise AttributeError(f"module 'fleet' has no attribute {name!r}")
