"""Limits per agent turn: model calls, tool calls and tokens.

A turn that loops (a model calling the same tool again and again, a prompt that makes it chatty)
costs money and holds a worker slot until something stops it. Each turn therefore runs under a
:class:`TurnLimits`: the fleet's defaults (``FLEET_MAX_MODEL_CALLS``, ``FLEET_MAX_TOOL_CALLS``,
``FLEET_TOKEN_BUDGET``), which an agent's own row may tighten or loosen with
:meth:`TurnLimits.override`. Going past one raises :class:`TurnLimitExceeded`, a
:class:`~fleet.errors.PermanentHandlerError`: the same input would loop again, so the message is
``dead`` at once with a reason that names the limit and the knob, and the turn is audited as
``turn_limit_exceeded``.

Where each is enforced (``fleet.turn.AuditHooks``): model calls by the SDK's ``max_turns`` (it
refuses to start call N+1); tool calls when a call is about to start (the call over the limit
never runs); tokens after each model call, from the usage the model reports (the offline model
reports an estimate, see ``fleet.offline_model.estimate_tokens``). A turn parked for an approval
and resumed later is one turn: all three counts go on from what the parked run kept
(``TurnContext.serialize`` / ``restore_counts``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fleet.errors import PermanentHandlerError
from fleet.settings import Settings

LimitName = Literal["model_calls", "tool_calls", "tokens"]

#: The knob behind each limit, named in the error when the limit comes from the settings.
SETTING = {
    "model_calls": "FLEET_MAX_MODEL_CALLS",
    "tool_calls": "FLEET_MAX_TOOL_CALLS",
    "tokens": "FLEET_TOKEN_BUDGET",
}
_FIELD = {
    "model_calls": "max_model_calls",
    "tool_calls": "max_tool_calls",
    "tokens": "token_budget",
}
_NOUN = {"model_calls": "model calls", "tool_calls": "tool calls", "tokens": "tokens"}


class TurnLimitExceeded(PermanentHandlerError):
    """A turn went past one of its limits; retrying would do the same, so the message is dead."""

    def __init__(self, limit: LimitName, used: int, maximum: int, origin: str) -> None:
        self.limit = limit
        self.used = used
        self.maximum = maximum
        self.origin = origin
        where = SETTING[limit] if origin == "settings" else f"{_FIELD[limit]} of {origin}"
        super().__init__(
            f"turn limit exceeded: {used} {_NOUN[limit]} > max {maximum} ({where})"
        )

    def audit_payload(self) -> dict[str, Any]:
        return {"limit": self.limit, "used": self.used, "max": self.maximum,
                "origin": self.origin, "setting": SETTING[self.limit]}


class TurnLimits(BaseModel):
    """The limits one turn runs under. Immutable; :meth:`override` returns a new one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_model_calls: int = Field(12, ge=1)
    """Model calls per turn (the SDK's ``max_turns``)."""

    max_tool_calls: int = Field(20, ge=1)
    """Tool and skill calls per turn, counted when each starts."""

    token_budget: int = Field(0, ge=0)
    """Input plus output tokens per turn, as the model reports them; 0: no budget."""

    origin: str = "settings"
    """Where the values come from (``settings``, or e.g. ``agent support``): named in errors."""

    @classmethod
    def from_settings(cls, settings: Settings) -> TurnLimits:
        return cls(
            max_model_calls=settings.fleet_max_model_calls,
            max_tool_calls=settings.fleet_max_tool_calls,
            token_budget=settings.fleet_token_budget,
        )

    def override(
        self, values: Mapping[str, Any] | None, *, origin: str | None = None
    ) -> TurnLimits:
        """These limits with the non-null ``values`` (``max_model_calls``, ``max_tool_calls``,
        ``token_budget``; e.g. from an agent's row) applied, validated like the settings."""
        changes = {k: v for k, v in (values or {}).items() if v is not None and k != "origin"}
        if not changes:
            return self
        return TurnLimits.model_validate(
            {**self.model_dump(), **changes, "origin": origin or self.origin}
        )

    # -- checks (called by the turn's hooks) ---------------------------------------------------

    def check_tool_calls(self, used: int) -> None:
        if used > self.max_tool_calls:
            raise TurnLimitExceeded("tool_calls", used, self.max_tool_calls, self.origin)

    def check_tokens(self, used: int) -> None:
        if self.token_budget and used > self.token_budget:
            raise TurnLimitExceeded("tokens", used, self.token_budget, self.origin)


__all__ = ["TurnLimitExceeded", "TurnLimits"]
