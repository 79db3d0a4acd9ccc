"""``fleet migrate``: numbered SQL files applied in order, once, by one process at a time.

* ``migrations/NNNN_name.sql`` run in order, each in its own transaction, and are recorded in
  ``fleet.schema_migrations`` with a checksum; a file edited after it was applied is an error
  (write a new migration instead).
* ``queue_sql/*functions.sql`` hold ``CREATE OR REPLACE`` definitions; they are re-applied after
  the numbered files whenever their checksum changes (Flyway's "repeatable" migrations).
* A session-level advisory lock serialises concurrent ``fleet migrate`` runs: with four processes
  starting at once, one applies and three find nothing left to do.
* Two placeholders are filled from the settings: ``{{EMBEDDING_DIM}}`` and ``{{EMBEDDING_MODEL}}``,
  so the vector column's width follows the configured embedding model.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from fleet.errors import MigrationError
from fleet.settings import PROJECT_ROOT, Settings

MIGRATIONS = PROJECT_ROOT / "migrations"
REPEATABLE = PROJECT_ROOT / "queue_sql"
_LOCK_KEY = 0x666C656574  # "fleet"
_FILE = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")

_BOOKKEEPING = """
CREATE SCHEMA IF NOT EXISTS fleet;
CREATE TABLE IF NOT EXISTS fleet.schema_migrations (
    version     text PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def text(self) -> str:
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def embedding_placeholders(settings: Settings) -> dict[str, str]:
    from fleet.embeddings import model_spec

    spec = model_spec(settings)
    return {"EMBEDDING_DIM": str(spec.dimensions), "EMBEDDING_MODEL": spec.name}


def discover() -> list[Migration]:
    """Numbered migrations, then repeatable function files, in the order they are applied."""
    found: list[Migration] = []
    for path in sorted(MIGRATIONS.glob("*.sql")):
        match = _FILE.match(path.name)
        if not match:
            raise MigrationError(f"migration file {path.name} is not named NNNN_name.sql")
        found.append(Migration(match["version"], match["name"], path))
    versions = [m.version for m in found]
    if len(versions) != len(set(versions)):
        raise MigrationError("two migration files share a version number")
    for path in sorted(REPEATABLE.glob("*functions.sql")):
        found.append(Migration(f"R:{path.stem}", path.stem, path))
    return found


def _render(text: str, placeholders: dict[str, str]) -> str:
    for key, value in placeholders.items():
        text = text.replace("{{" + key + "}}", value)
    return text


async def migrate(conn: asyncpg.Connection, settings: Settings) -> list[str]:
    """Apply what is missing; return the versions applied by this call."""
    has_vector = await conn.fetchval(
        "SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'"
    )
    if not has_vector:
        raise MigrationError(
            "this database has no pgvector extension available; install pgvector >= 0.5 on the "
            "server (or unset DATABASE_URL to use the embedded PostgreSQL, which ships it)"
        )
    placeholders = embedding_placeholders(settings)
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(_BOOKKEEPING)
        recorded = {
            row["version"]: row["checksum"]
            for row in await conn.fetch("SELECT version, checksum FROM fleet.schema_migrations")
        }
        for migration in discover():
            known = recorded.get(migration.version)
            repeatable = migration.version.startswith("R:")
            if known == migration.checksum:
                continue
            if known is not None and not repeatable:
                raise MigrationError(
                    f"migration {migration.path.name} changed after it was applied; "
                    "add a new numbered migration instead of editing an applied one"
                )
            async with conn.transaction():
                try:
                    await conn.execute(_render(migration.text, placeholders))
                except asyncpg.PostgresError as exc:
                    raise MigrationError(f"migration {migration.path.name} failed: {exc}") from exc
                await conn.execute(
                    """INSERT INTO fleet.schema_migrations (version, name, checksum)
                       VALUES ($1, $2, $3)
                       ON CONFLICT (version) DO UPDATE
                       SET checksum = EXCLUDED.checksum, applied_at = now()""",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            applied_now.append(migration.version)
        await _default_agent(conn, settings)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now


async def _default_agent(conn: asyncpg.Connection, settings: Settings) -> None:
    """The ``support`` agent row (get_or_create: an operator's edits are kept). Its text lives
    in Python (:mod:`fleet.agents`), so it is written here rather than by a SQL migration."""
    from fleet.agents import ensure_default
    from fleet.skills import SkillLibrary

    await ensure_default(conn, SkillLibrary.from_settings(settings).skills)


async def pending(conn: asyncpg.Connection) -> list[str]:
    """Versions not yet applied (or repeatables whose content changed)."""
    exists = await conn.fetchval("SELECT to_regclass('fleet.schema_migrations') IS NOT NULL")
    recorded: dict[str, str] = {}
    if exists:
        recorded = {
            row["version"]: row["checksum"]
            for row in await conn.fetch("SELECT version, checksum FROM fleet.schema_migrations")
        }
    return [m.version for m in discover() if recorded.get(m.version) != m.checksum]
