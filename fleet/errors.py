"""The fleet's exceptions, all under one base so the CLI can turn any of them into one sentence.

FleetError                      anything the fleet raises on purpose
├── ConfigurationError          a knob or the environment is wrong (names the knob)
├── EmbeddedDatabaseError       the embedded PostgreSQL could not be prepared or started
├── MigrationError              the database cannot be migrated (e.g. no pgvector)
├── InvalidInput                bad user input (names the field); nothing was written
├── NotFound                    an id that does not exist
├── LeaseLost                   a worker's claim on a message was taken over (fencing)
├── TurnCancelled               someone cancelled the running message; it stopped at a step
└── HandlerError                a handler failed; the queue decides retry or dead
    └── PermanentHandlerError   a failure retrying cannot fix: the message goes dead at once
"""

from __future__ import annotations


class FleetError(Exception):
    """Base of every error the fleet raises deliberately."""


class ConfigurationError(FleetError):
    """A setting or the environment is unusable."""


class EmbeddedDatabaseError(FleetError):
    """The embedded PostgreSQL could not be prepared, started or stopped."""


class MigrationError(FleetError):
    """Migrations cannot be applied to this database."""


class InvalidInput(FleetError):
    """User input was rejected before anything was written."""


class NotFound(FleetError):
    """The requested object does not exist."""


class LeaseLost(FleetError):
    """This worker no longer owns the message: its lease expired and another worker took it."""


class TurnCancelled(FleetError):
    """The message was cancelled while it ran: the handler stopped at its next step, and the
    worker finishes the message as ``cancelled`` (not a failure: nothing is retried)."""


class HandlerError(FleetError):
    """A handler failed in a way the queue may retry."""


class PermanentHandlerError(HandlerError):
    """A handler failed in a way that retrying cannot fix."""
