"""``fleet agents create | list | show | update``: agents as database rows.

Workers build each turn's agent from its row (cached by version), so a change here reaches the
next turn of every worker without a restart. Definitions are validated before anything is
written (unknown tool, skill or sub-agent; a cycle of sub-agents).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from fleet.cli.app import JsonOption, app, emit_json, emit_table, run_on_connection, settings
from fleet.errors import InvalidInput

agents_app = typer.Typer(help="Agents as database rows (instructions, tools, skills, "
                              "sub-agents).", no_args_is_help=True)
app.add_typer(agents_app, name="agents")

ModelOption = typer.Option(None, "--model",
                           help="Model name; '' means the fleet's FLEET_MODEL.")
InstructionsOption = typer.Option(None, "--instructions", help="The agent's instructions.")
InstructionsFileOption = typer.Option(None, "--instructions-file",
                                      help="Read the instructions from this file.")
ToolOption = typer.Option(None, "--tool", help="A customer-data tool it may call; repeatable.")
SkillOption = typer.Option(None, "--skill", help="A skill it may load; repeatable.")
SubAgentOption = typer.Option(None, "--sub-agent",
                              help="An agent it may delegate to (as tool ask_<name>); "
                                   "repeatable.")
MetadataOption = typer.Option(None, "--metadata", help="KEY=VALUE (VALUE as JSON when it "
                                                       "parses); repeatable.")


def _metadata(pairs: list[str] | None) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--metadata expects KEY=VALUE, got {pair!r}")
        try:
            data[key] = json.loads(value)
        except json.JSONDecodeError:
            data[key] = value
    return data


def _instructions(text: str | None, path: Path | None) -> str | None:
    if text is not None and path is not None:
        raise InvalidInput("give --instructions or --instructions-file, not both")
    if path is not None:
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidInput(f"cannot read --instructions-file {str(path)!r}: "
                               f"{exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"--instructions-file {str(path)!r} is not UTF-8 text (byte "
                               f"{exc.start}); save the instructions as UTF-8") from exc
    return text


def _known_skills() -> list[str]:
    from fleet.skills import SkillLibrary

    return sorted(SkillLibrary.from_settings(settings()).skills)


def _summary(row: Any) -> dict[str, Any]:
    return {
        "name": row.name,
        "version": row.version,
        "model": row.model or "(fleet default)",
        "tools": ",".join(row.tools) or "-",
        "skills": ",".join(row.skills) or "-",
        "sub_agents": ",".join(row.sub_agents) or "-",
        "updated_at": row.updated_at,
    }


def _show(row: Any, as_json: bool) -> None:
    if as_json:
        emit_json(row)
        return
    for key in ("name", "id", "version", "model", "tools", "skills", "sub_agents", "metadata",
                "created_at", "updated_at"):
        value = getattr(row, key)
        if isinstance(value, list):
            value = ", ".join(value) or "-"
        elif key == "model" and value is None:
            value = "(fleet default)"
        elif isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        typer.echo(f"{key}: {value}")
    typer.echo("instructions:")
    for line in row.instructions.splitlines():
        typer.echo(f"  {line}")


@agents_app.command("create")
def create_command(
    name: str = typer.Argument(..., help="The agent's name (lower-case, e.g. tier2)."),
    model: str | None = ModelOption,
    instructions: str | None = InstructionsOption,
    instructions_file: Path | None = InstructionsFileOption,
    tool: list[str] | None = ToolOption,
    skill: list[str] | None = SkillOption,
    sub_agent: list[str] | None = SubAgentOption,
    metadata: list[str] | None = MetadataOption,
    as_json: bool = JsonOption,
) -> None:
    """Define a new agent (version 1)."""
    from fleet import agents

    text = _instructions(instructions, instructions_file)
    if text is None:
        raise InvalidInput("an agent needs --instructions or --instructions-file")
    spec = agents.spec_from(name=name, model=model, instructions=text, tools=tool or [],
                            skills=skill or [], sub_agents=sub_agent or [],
                            metadata=_metadata(metadata))
    skills = _known_skills()
    row = run_on_connection(lambda c: agents.create(c, spec, known_skills=skills))
    _show(row, as_json)


@agents_app.command("update")
def update_command(
    name: str = typer.Argument(..., help="The agent to change."),
    model: str | None = ModelOption,
    instructions: str | None = InstructionsOption,
    instructions_file: Path | None = InstructionsFileOption,
    tool: list[str] | None = ToolOption,
    skill: list[str] | None = SkillOption,
    sub_agent: list[str] | None = SubAgentOption,
    no_tools: bool = typer.Option(False, "--no-tools", help="Remove every tool."),
    no_skills: bool = typer.Option(False, "--no-skills", help="Remove every skill."),
    no_sub_agents: bool = typer.Option(False, "--no-sub-agents",
                                       help="Remove every sub-agent."),
    metadata: list[str] | None = MetadataOption,
    as_json: bool = JsonOption,
) -> None:
    """Change an agent; the version goes up by one and the next turn uses it. A list option
    (--tool, --skill, --sub-agent) replaces that whole list; --metadata merges keys."""
    from fleet import agents

    changes: dict[str, Any] = {}
    if model is not None:
        changes["model"] = model
    text = _instructions(instructions, instructions_file)
    if text is not None:
        changes["instructions"] = text
    for key, values, clear in (("tools", tool, no_tools), ("skills", skill, no_skills),
                               ("sub_agents", sub_agent, no_sub_agents)):
        if values and clear:
            raise InvalidInput(f"give --{key.replace('_', '-')[:-1]} or --no-"
                               f"{key.replace('_', '-')}, not both")
        if values or clear:
            changes[key] = list(values or [])
    extra = _metadata(metadata)
    if not changes and not extra:
        raise InvalidInput("nothing to update; give at least one option (see --help)")
    skills = _known_skills()

    row = run_on_connection(lambda c: agents.update(
        c, name, changes, known_skills=skills, merge_metadata=extra))
    _show(row, as_json)


@agents_app.command("list")
def list_command(as_json: bool = JsonOption) -> None:
    """Every agent: name, version, model, tools, skills, sub-agents."""
    from fleet import agents

    rows = run_on_connection(agents.list_agents)
    if as_json:
        emit_json(rows)
        return
    emit_table([_summary(r) for r in rows],
               ["name", "version", "model", "tools", "skills", "sub_agents", "updated_at"],
               width=60)


@agents_app.command("show")
def show_command(
    name: str = typer.Argument(..., help="The agent's name."),
    as_json: bool = JsonOption,
) -> None:
    """One agent's whole definition, instructions included."""
    from fleet import agents

    _show(run_on_connection(lambda c: agents.get(c, name)), as_json)
