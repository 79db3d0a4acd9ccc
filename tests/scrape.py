"""Scraping a real /metrics endpoint, and the metric names a PromQL expression reads."""

from __future__ import annotations

import re
import socket
import urllib.request
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_text(port: int, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        return response.read().decode()


class Scrape:
    """One scrape's samples: ``scrape.value("fleet_x_total", outcome="done")``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]

    @property
    def names(self) -> set[str]:
        return {name for name, _, _ in self.samples}

    def values(self, name: str, **labels: str) -> list[float]:
        return [
            value
            for sample, sample_labels, value in self.samples
            if sample == name and all(sample_labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum over every series of ``name`` matching ``labels`` (KeyError when none)."""
        found = self.values(name, **labels)
        if not found:
            raise KeyError(f"no sample {name}{labels or ''} in the scrape")
        return sum(found)


def scrape(port: int) -> Scrape:
    return Scrape(scrape_text(port))


# -- PromQL ------------------------------------------------------------------------------------

_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan", "atan2",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (a small lexer, enough for our own rules).

    Strings, label matchers, ranges and grouping clauses are removed first; what remains is
    identifiers, which are function names (followed by ``(``), keywords or metric names. Grafana
    variables (``$__rate_interval``) sit inside ranges and go with them.
    """
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        word = match.group()
        rest = text[match.end() :].lstrip()
        before = text[: match.start()]
        if rest.startswith("("):
            continue  # a function
        if word.lower() in _KEYWORDS or before.endswith("$"):
            continue
        if before[-1:].isdigit():
            continue  # a unit or exponent: 5m, 1e3
        names.add(word)
    return names


def all_metric_names(exprs: Iterable[str]) -> set[str]:
    names: set[str] = set()
    for expr in exprs:
        names |= promql_metric_names(expr)
    return names
