"""The input guardrail: screens the newest customer message before the model sees it.

With a Session the guardrail receives the whole prepared input, history included, so a flagged
message from an earlier turn would trip every later turn (course Decision 7). This one reads
only the newest ``role: user`` item. It trips on:

* a message longer than ``FLEET_MAX_INPUT_CHARS`` (cost and context abuse);
* a prompt-injection attempt: instructions aimed at the agent rather than a support request
  ("ignore previous instructions", "reveal your system prompt", "you are now ...").

It runs before the model (``run_in_parallel=False``), so a tripped turn costs no model call and
no tool runs. The turn turns the trip into a ``guardrail_tripped`` audit row and a polite reply;
the message never enters the conversation's memory.
"""

from __future__ import annotations

import re
from typing import Any

from agents import Agent, GuardrailFunctionOutput, InputGuardrail, RunContextWrapper

INJECTION = re.compile(
    r"\b(?:ignore|disregard|forget|override)\b[^.!?\n]{0,40}"
    r"\b(?:previous|prior|above|earlier|all|your|the)\b[^.!?\n]{0,20}"
    r"\b(?:instructions?|prompts?|rules|guidelines|directions)\b"
    r"|\b(?:reveal|print|show|repeat|leak)\b[^.!?\n]{0,30}\b(?:system|developer|hidden)\s+"
    r"(?:prompt|instructions?|message)"
    r"|\byou are now\b|\bact as (?:an? )?(?:admin|administrator|developer|system)\b"
    r"|\b(?:developer|god|jailbreak|dan) mode\b"
    r"|<\s*/?\s*(?:system|assistant)\s*>",
    re.IGNORECASE,
)

REFUSAL = (
    "I'm sorry, I can't help with that message as written. If you have a question about an "
    "order, a refund or your account, please send it in a short message and I'll take it from "
    "there."
)


def newest_user_text(items: str | list[Any]) -> str:
    """The text of the newest ``role: user`` item of the input (all of it when a string)."""
    if isinstance(items, str):
        return items
    for item in reversed(items):
        data = item if isinstance(item, dict) else getattr(item, "model_dump", dict)()
        if data.get("role") == "user":
            content = data.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "\n".join(
                    str(part.get("text", "")) for part in content if isinstance(part, dict)
                )
    return ""


def screen(text: str, max_chars: int) -> dict[str, Any] | None:
    """Why ``text`` must not reach the model, or None when it may."""
    if len(text) > max_chars:
        return {"reason": "too_long", "chars": len(text), "limit": max_chars}
    match = INJECTION.search(text)
    if match:
        return {"reason": "prompt_injection", "matched": match.group(0)[:80]}
    return None


def input_guardrail(max_chars: int) -> InputGuardrail[Any]:
    """The guardrail for the support agent (a ``fleet.guardrails.screen`` of the newest item)."""

    def check(
        _ctx: RunContextWrapper[Any], _agent: Agent[Any], items: str | list[Any]
    ) -> GuardrailFunctionOutput:
        verdict = screen(newest_user_text(items), max_chars)
        return GuardrailFunctionOutput(output_info=verdict, tripwire_triggered=verdict is not None)

    return InputGuardrail(guardrail_function=check, name="input_screen", run_in_parallel=False)
