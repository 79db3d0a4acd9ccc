"""The tracebacks in a process log, each with the log record that printed it and the exception
classes of its chain, for the chaos suites' "nothing crashed" checks.

Why not a substring search: a log line like "Error invoking MCP tool" says which code logged a
traceback, not what was raised. A check that tolerated every traceback after such a line would
also tolerate a ``TypeError`` in our own code raised inside a tool call. So each traceback is
parsed into the classes it names (the whole ``raise ... from`` / "during handling" chain and the
members of exception groups), each name is resolved to the class itself, and a traceback is
tolerated only when a rule names its log record *and* every class in it is a subclass of what
that rule expects.

The log format is the one ``fleet`` configures (``fleet.cli.app.setup_logging``):
``2026-12-01 16:55:02,123 WARNING asyncpg.pool: message``; uvicorn's own lines in the MCP
server's log (``ERROR:    message``) are records of the logger ``uvicorn``.
"""

from __future__ import annotations

import builtins
import importlib
import re
from dataclasses import dataclass, field

_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ (\S+): (.*)$")
#: uvicorn's own records in the MCP server's log (``ERROR:    Exception in ASGI application``)
_UVICORN_RECORD = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL):\s+(.*)$")
#: the margin an exception group draws around its members' tracebacks
_MARGIN = re.compile(r"^\s*\| ?")
#: an exception group's member separators (``+-+---- 1 ----``, ``+------``)
_GROUP_RULE = re.compile(r"^\s*\+[-+]")
_CHAIN = (
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
)
_NAME = re.compile(r"^[A-Za-z_][\w.]*$")


@dataclass
class LoggedTraceback:
    """One logged traceback: the record that printed it (None: printed outside a log record)
    and the exception names of its chain, in printed order (the raised one last)."""

    logger: str | None
    message: str | None
    exceptions: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.logger}: {self.message!r} -> {' / '.join(self.exceptions)}"


@dataclass(frozen=True)
class Tolerated:
    """Tracebacks a log may hold: printed by ``logger`` with a message starting ``message``,
    every exception in the chain (groups aside) a subclass of one of ``classes``."""

    logger: str | None
    message: str
    classes: tuple[type[BaseException], ...]

    def allows(self, tb: LoggedTraceback) -> bool:
        if self.logger is not None and tb.logger != self.logger:
            return False
        if tb.message is None or not tb.message.startswith(self.message):
            return False
        members = [resolve(n) for n in tb.exceptions]
        leaves = [c for c in members if c is None or not issubclass(c, BaseExceptionGroup)]
        return bool(leaves) and all(c is not None and issubclass(c, self.classes) for c in leaves)


def resolve(name: str) -> type[BaseException] | None:
    """The exception class a traceback names (``ConnectionRefusedError``,
    ``asyncpg.exceptions.CannotConnectNowError``); None when it cannot be imported."""
    module, _, attr = name.rpartition(".")
    try:
        found = getattr(importlib.import_module(module) if module else builtins, attr)
    except (ImportError, AttributeError, ValueError):
        return None
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


def _record(line: str) -> tuple[str, str] | None:
    """(logger, message) when ``line`` starts a log record."""
    if found := _RECORD.match(line):
        return found[1], found[2]
    if found := _UVICORN_RECORD.match(line):
        return "uvicorn", found[1]
    return None


def tracebacks(logs: str) -> list[LoggedTraceback]:
    """Every traceback in ``logs``. A traceback belongs to a log record only when it starts on
    the line right after the record (as ``exc_info`` prints it); chained tracebacks and group
    members belong to the traceback before them."""
    found: list[LoggedTraceback] = []
    header: tuple[str, str] | None = None  # the record on the line before, if any
    current: LoggedTraceback | None = None
    joins = False  # the last non-blank line continues the current traceback's chain
    in_frames = False  # inside a traceback, before its exception line
    for raw in logs.splitlines():
        record = _record(raw)
        if record:
            header, current, joins, in_frames = record, None, False, False
            continue
        if _GROUP_RULE.match(raw):
            joins = current is not None
            continue
        line = raw
        while _MARGIN.match(line):
            line = _MARGIN.sub("", line, count=1)
        if not line.strip():
            continue
        if "Traceback (most recent call last):" in line:
            if current is None or not joins:
                logger, message = header if header else (None, None)
                current = LoggedTraceback(logger, message)
                found.append(current)
            header, joins, in_frames = None, False, True
            continue
        if in_frames:
            if line[0].isspace():
                continue  # a frame, its source line or its ^^^ marks
            name = line.split(":", 1)[0].strip()
            assert current is not None
            current.exceptions.append(name if _NAME.match(name) else f"<unparsed {line!r}>")
            in_frames = False
            continue
        name = line.split(":", 1)[0].strip()
        if header is not None and _NAME.match(name) and resolve(name) is not None:
            # A chain whose first exception has no frames (a cause raised outside any call
            # Python recorded, e.g. asyncpg's ConnectionResetError) starts with its bare
            # exception line, right after the record: the chain is that record's.
            current = LoggedTraceback(*header, exceptions=[name])
            found.append(current)
            header, joins = None, False
            continue
        header = None
        joins = current is not None and line.strip() in _CHAIN
    return found


def untolerated(logs: str, rules: list[Tolerated]) -> list[str]:
    """The tracebacks in ``logs`` no rule tolerates, described (empty: none)."""
    return [tb.describe() for tb in tracebacks(logs) if not any(r.allows(tb) for r in rules)]
