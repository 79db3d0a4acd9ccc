"""TurnLimits: the settings' defaults, an agent's overrides, and the errors that name the knob
(no database: control flow only; the limits on real turns are in test_turn_control.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fleet.errors import PermanentHandlerError
from fleet.limits import TurnLimitExceeded, TurnLimits
from fleet.settings import Settings


def test_defaults_come_from_the_settings() -> None:
    limits = TurnLimits.from_settings(
        Settings(fleet_max_model_calls=5, fleet_max_tool_calls=7, fleet_token_budget=900)
    )
    assert (limits.max_model_calls, limits.max_tool_calls, limits.token_budget) == (5, 7, 900)
    assert TurnLimits.from_settings(Settings()).token_budget == 0  # no budget by default


def test_errors_name_the_knob_and_are_permanent() -> None:
    limits = TurnLimits(max_model_calls=12, max_tool_calls=2, token_budget=100)
    limits.check_tool_calls(2)
    # Model calls are refused by the SDK's max_turns; the turn reports them with this error.
    error = TurnLimitExceeded("model_calls", 13, limits.max_model_calls, limits.origin)
    assert str(error) == "turn limit exceeded: 13 model calls > max 12 (FLEET_MAX_MODEL_CALLS)"
    assert isinstance(error, PermanentHandlerError)
    with pytest.raises(TurnLimitExceeded, match=r"3 tool calls > max 2 \(FLEET_MAX_TOOL_CALLS\)"):
        limits.check_tool_calls(3)
    with pytest.raises(TurnLimitExceeded, match=r"101 tokens > max 100 \(FLEET_TOKEN_BUDGET\)"):
        limits.check_tokens(101)
    TurnLimits(token_budget=0).check_tokens(10**9)  # 0: unlimited


def test_an_agents_override_replaces_only_what_it_sets_and_is_named_in_errors() -> None:
    base = TurnLimits(max_model_calls=12, max_tool_calls=20, token_budget=0)
    assert base.override(None) is base and base.override({"max_tool_calls": None}) is base
    tight = base.override({"max_tool_calls": 3}, origin="agent billing")
    assert (tight.max_model_calls, tight.max_tool_calls, tight.origin) == (12, 3, "agent billing")
    assert base.max_tool_calls == 20  # immutable
    with pytest.raises(TurnLimitExceeded, match=r"max_tool_calls of agent billing"):
        tight.check_tool_calls(4)
    with pytest.raises(ValidationError):
        base.override({"max_model_calls": 0})
    with pytest.raises(ValidationError):
        base.override({"max_turns": 5})  # unknown key
