"""Named SQL statements, loaded from ``.sql`` files.

A file holds blocks that start with ``-- name: <name>``; the comment lines right under the name
describe the statement, and everything up to the next ``-- name:`` is the statement itself. The
statements stay plain SQL that a reviewer can diff and a DBA can paste into psql and EXPLAIN.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from fleet.settings import PROJECT_ROOT

QUEUE_SQL = PROJECT_ROOT / "queue_sql"

_NAME = re.compile(r"^--\s*name:\s*(?P<name>[a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, str]:
    """Split a file of named statements into ``{name: statement}``."""
    statements: dict[str, str] = {}
    matches = list(_NAME.finditer(text))
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        body = text[match.end() : end].strip()
        lines = [line for line in body.splitlines() if not line.lstrip().startswith("--")]
        name = match["name"]
        if name in statements:
            raise ValueError(f"duplicate SQL statement name {name!r}")
        statements[name] = "\n".join(lines).strip().rstrip(";")
    return statements


@cache
def load(path: Path) -> dict[str, str]:
    """The named statements of one file (cached: the files do not change while we run)."""
    return parse(path.read_text())


def queries(filename: str) -> dict[str, str]:
    """Named statements of ``queue_sql/<filename>``."""
    return load(QUEUE_SQL / filename)
