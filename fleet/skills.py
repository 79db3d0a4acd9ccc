"""Skills: ``skills/<name>/SKILL.md`` folders, disclosed to the agent in three stages.

1. **Discovery**: at worker start every ``SKILL.md``'s frontmatter (name + description) is read
   once; the index goes into the agent's instructions (about 100 tokens per skill).
2. **Activation**: the model calls ``load_skill(name)`` and gets the SKILL.md body.
3. **Execution**: ``load_skill(name, reference="references/x.md")`` returns one file the body
   points to, only when the model reaches for it. Paths are confined to the skill's folder.

Why not the SDK's sandbox ``Skills`` capability: it needs a ``SandboxAgent`` with a sandbox
session per run; its lazy ``load_skill`` copies the skill folder into a fresh workspace and the
model then reads SKILL.md through the shell capability (a subprocess per read), with no OS
isolation on Linux. Measured (``fleet bench turns --sandbox-skills``): 65-130 ms of CPU per
run against 4-10 ms for this function tool, alone 3-6x the whole per-turn CPU budget of a
concurrent worker (BENCHMARKS.md). The folders, the frontmatter and the three stages are the same,
so the skills still load unchanged in Claude Code, OpenCode or a SandboxAgent.

Every activation (stage 2 or 3) is audited as ``skill_activated`` by the turn's hooks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents import FunctionTool, RunContextWrapper

from fleet.settings import PROJECT_ROOT

SKILLS_DIR = PROJECT_ROOT / "skills"
LOAD_SKILL = "load_skill"

_FRONTMATTER = re.compile(r"\A---\s*\n(?P<meta>.*?)\n---\s*\n?(?P<body>.*)\Z", re.DOTALL)


class SkillError(Exception):
    """A skill or reference the model asked for does not exist (reported to the model)."""


@dataclass(frozen=True)
class Skill:
    name: str
    description: str
    folder: Path
    body: str

    def reference(self, relative: str) -> str:
        """Stage 3: one file inside the skill's folder."""
        target = (self.folder / relative).resolve()
        if not target.is_relative_to(self.folder.resolve()) or not target.is_file():
            available = ", ".join(self.references()) or "none"
            raise SkillError(
                f"skill {self.name!r} has no file {relative!r}; its references: {available}"
            )
        return target.read_text(encoding="utf-8")

    def references(self) -> list[str]:
        return sorted(
            str(p.relative_to(self.folder))
            for p in self.folder.rglob("*")
            if p.is_file() and p.name != "SKILL.md"
        )


def parse_frontmatter(text: str) -> tuple[dict[str, str], str]:
    """``name:``/``description:`` style frontmatter (one ``key: value`` per line) and the body."""
    match = _FRONTMATTER.match(text)
    if not match:
        return {}, text
    meta: dict[str, str] = {}
    for line in match["meta"].splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            meta[key.strip()] = value.strip().strip("\"'")
    return meta, match["body"].strip()


class SkillLibrary:
    """The skills of one folder, discovered once (stage 1); bodies are served on demand."""

    def __init__(self, root: Path = SKILLS_DIR) -> None:
        self.root = root
        self.skills: dict[str, Skill] = {}
        for skill_md in sorted(root.glob("*/SKILL.md")) if root.is_dir() else []:
            meta, body = parse_frontmatter(skill_md.read_text(encoding="utf-8"))
            name = meta.get("name") or skill_md.parent.name
            self.skills[name] = Skill(
                name=name,
                description=meta.get("description", "No description provided."),
                folder=skill_md.parent,
                body=body,
            )

    @classmethod
    def from_settings(cls, settings: Any) -> SkillLibrary:
        """The library at ``FLEET_SKILLS_DIR`` (default: ``skills/`` in the checkout)."""
        root = getattr(settings, "fleet_skills_dir", None)
        return cls(Path(root) if root else SKILLS_DIR)

    def subset(self, names: Any) -> SkillLibrary:
        """The same skills restricted to ``names`` (one agent's skills), without re-reading."""
        wanted = set(names)
        library = SkillLibrary.__new__(SkillLibrary)
        library.root = self.root
        library.skills = {n: s for n, s in self.skills.items() if n in wanted}
        return library

    def index(self) -> str:
        """Stage 1, for the instructions: one line per skill."""
        if not self.skills:
            return ""
        lines = [
            "## Skills",
            f"Call `{LOAD_SKILL}` with a skill's name BEFORE doing what it describes; its "
            "instructions then tell you what to produce. Load a reference file only when the "
            "instructions point you to it.",
        ]
        lines += [f"- {s.name}: {s.description}" for s in self.skills.values()]
        return "\n".join(lines)

    def load(self, name: str, reference: str | None = None) -> str:
        skill = self.skills.get(name)
        if skill is None:
            raise SkillError(
                f"no skill named {name!r}; available: {', '.join(self.skills) or 'none'}"
            )
        if reference:
            return skill.reference(reference)
        return skill.body

    def tool(self) -> FunctionTool:
        """The ``load_skill`` function tool (stages 2 and 3)."""
        library = self

        async def invoke(_ctx: RunContextWrapper[Any], raw: str) -> str:
            try:
                args = json.loads(raw or "{}")
                return library.load(str(args.get("name", "")), args.get("reference") or None)
            except SkillError as exc:
                return f"error: {exc}"
            except ValueError:
                return "error: load_skill takes a JSON object with 'name' (and 'reference')"

        return FunctionTool(
            name=LOAD_SKILL,
            description=(
                "Load a skill's instructions (its SKILL.md body) by name, or one reference file "
                "the instructions point to (reference='references/<file>.md')."
            ),
            params_json_schema={
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": sorted(self.skills)},
                    "reference": {
                        "type": ["string", "null"],
                        "description": "Optional path of a file inside the skill's folder.",
                    },
                },
                "required": ["name", "reference"],
                "additionalProperties": False,
            },
            on_invoke_tool=invoke,
            strict_json_schema=False,
        )
