"""The documentation keeps up with the code: every knob and every command is in README.md."""

from __future__ import annotations

import re
from pathlib import Path

import typer.main

from fleet.cli import app
from fleet.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_documented_in_the_readme() -> None:
    names = [(field.alias or name).upper() for name, field in Settings.model_fields.items()]
    missing = [name for name in names if f"`{name}`" not in README]
    assert not missing, f"settings missing from README.md's configuration table: {missing}"


def _commands(group: object, prefix: str = "fleet") -> list[str]:
    found = []
    for name, command in getattr(group, "commands", {}).items():
        path = f"{prefix} {name}"
        found.extend(_commands(command, path) if getattr(command, "commands", None) else [path])
    return found


def test_every_command_is_documented_in_the_readme() -> None:
    commands = _commands(typer.main.get_command(app))
    assert len(commands) > 20
    text = re.sub(r"\s+", " ", README)

    def documented(command: str) -> bool:
        # `fleet db up \| down \| status` documents `fleet db down` too.
        parent, _, leaf = command.rpartition(" ")
        return command in text or any(
            re.match(rf"[\w \\|-]{{0,40}}\\\| {leaf}\b", text[m.end():])
            for m in re.finditer(re.escape(parent + " "), text))

    missing = [c for c in commands if not documented(c)]
    assert not missing, f"commands missing from README.md: {missing}"
