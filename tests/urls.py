"""Test URLs of the test server under another login.

The embedded server's URL names its Unix socket folder as the host, percent-encoded
(``postgresql://postgres@%2F...%2Frun:PORT/fleet``), so a URL is rewritten around its host as
written: ``urlparse().hostname`` lower-cases it, which would change the folder.
"""

from __future__ import annotations

from urllib.parse import unquote, urlparse, urlunparse


def host_and_port(url: str) -> str:
    """The URL's ``host:port`` (or host) exactly as written."""
    return urlparse(url).netloc.rpartition("@")[2]


def as_login(url: str, user: str, password: str | None = None) -> str:
    """``url`` with ``user`` (and ``password``) as its login, same server and database."""
    login = f"{user}:{password}" if password else user
    return urlunparse(urlparse(url)._replace(netloc=f"{login}@{host_and_port(url)}"))


def server_address(url: str) -> tuple[str, int]:
    """(host or socket folder, port) for programs configured with the two apart (PgBouncer)."""
    parts = urlparse(url)
    host = host_and_port(url)
    if ":" in host and not host.endswith("]"):
        host = host.rpartition(":")[0]
    return unquote(host), parts.port or 5432
