"""Which model an agent turn runs: the offline support policy or an OpenAI-compatible server.

* ``FLEET_MODEL=offline`` (the default without ``OPENAI_API_KEY``):
  :class:`fleet.offline_model.OfflineSupportPolicy`, a deterministic rule-based policy (not an
  LLM) behind the SDK's ``Model`` interface.
* any other name: that model over the chat-completions wire, on the OpenAI API or on any
  OpenAI-compatible server at ``OPENAI_BASE_URL`` (vLLM, Ollama, LiteLLM, ...). One client per
  worker process, shared by its turns (it is a connection pool, safe to share).

Either way the model is wrapped by :func:`fleet.tracing.traced_model` (a span, latency, tokens
and estimated cost per request; free when tracing is off).
"""

from __future__ import annotations

from agents import Model, OpenAIChatCompletionsModel
from openai import AsyncOpenAI

from fleet import tracing
from fleet.offline_model import OfflineSupportPolicy
from fleet.settings import Settings

OFFLINE = "offline"


def build_model(settings: Settings) -> Model:
    name = settings.model_name
    if name == OFFLINE:
        inner: Model = OfflineSupportPolicy(latency=settings.fleet_offline_latency_seconds)
    else:
        key = settings.openai_api_key
        client = AsyncOpenAI(
            base_url=settings.openai_base_url,
            # Local OpenAI-compatible servers often need no key; the client insists on one.
            api_key=key.get_secret_value() if key else "not-needed",
        )
        inner = OpenAIChatCompletionsModel(model=name, openai_client=client)
    return tracing.traced_model(inner, name)
