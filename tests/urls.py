"""Test URLs of the test server under another login.

The embedded server's URL names its Unix socket folder as the host, percent-encoded
(``postgresql://postgres@%2F...%2Frun:PORT/fleet``), so a URL is rewritten around its host as
written: ``urlparse().hostname`` lower-cases it, which would change the folder.
"""

from __future__ import annotations

from urllib.parse import urlparse, urlunparse


def as_login(url: str, user: str, password: str | None = None) -> str:
    """``url`` with ``user`` (and ``password``) as its login, same server and database."""
    parts = urlparse(url)
    login = f"{user}:{password}" if password else user
    return urlunparse(parts._replace(netloc=f"{login}@{parts.netloc.rpartition('@')[2]}"))
