"""The ``fleet`` command line.

Each group of commands lives in its own module and registers itself on :data:`app`. Errors the
fleet raises on purpose (:class:`~fleet.errors.FleetError`), database errors and connection
failures become one sentence on stderr and a non-zero exit; never a traceback.
"""

from __future__ import annotations

import sys

import asyncpg
import typer

# Command modules register their commands on `app` when imported.
from fleet.cli import db as _db  # noqa: F401
from fleet.cli import queue as _queue  # noqa: F401
from fleet.cli.app import app
from fleet.errors import FleetError, InvalidInput, NotFound

for _optional in ("data", "approvals", "agents", "sessions", "trace", "demo", "bench", "metrics",
                  "audit"):
    try:
        __import__(f"fleet.cli.{_optional}")
    except ModuleNotFoundError as _exc:  # a command group not written yet
        if _exc.name != f"fleet.cli.{_optional}":
            raise


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, InvalidInput):
        return 2
    if isinstance(exc, NotFound):
        return 3
    return 1


def main() -> None:
    """Console-script entry point."""
    try:
        # Without standalone mode click does not exit for a command's `raise typer.Exit(n)`: it
        # returns n (commands themselves return None), so the code is passed on here.
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except FleetError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(_exit_code(exc))
    except asyncpg.PostgresError as exc:
        typer.echo(f"error: database: {getattr(exc, 'message', None) or exc}", err=True)
        sys.exit(1)
    except (OSError, asyncpg.InterfaceError) as exc:
        typer.echo(f"error: cannot reach the database or server: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:  # usage errors (a missing argument, a bad option) and the like
        show = getattr(exc, "show", None)
        if callable(show) and isinstance(getattr(exc, "exit_code", None), int):
            # typer's vendored click raises its own ClickException classes, not click's.
            show()
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        typer.echo(f"error: unexpected {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    if isinstance(code, int) and not isinstance(code, bool) and code:
        sys.exit(code)
