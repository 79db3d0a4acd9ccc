"""Every knob of the fleet, read once from the environment.

One pydantic settings object so that a knob has exactly one name, one default and one
docstring; README.md's configuration table is written from the same fields. Modules take a
``Settings`` argument instead of reading ``os.environ`` themselves, which keeps tests able to run
several differently configured fleets in one process.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The checkout's root: ``migrations/``, ``queue_sql/`` and ``skills/`` live beside ``fleet/``.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

#: The largest message body ``fleet.enqueue`` accepts, in bytes (UTF-8). Kept in sync with the
#: CHECK constraint in ``migrations/0001_fleet_queue.sql``.
MAX_BODY_BYTES = 16_384


class Settings(BaseSettings):
    """Configuration from environment variables (names are the field names, upper-cased)."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    database_url: str | None = None
    """Any PostgreSQL >= 14 with pgvector. Unset: the embedded server under ``FLEET_HOME``."""

    fleet_home: Path = Path(".fleet")
    """Where the embedded server keeps its data (``pgdata/``) and its binaries' copy."""

    fleet_embedded_port: int = 0
    """Port of the embedded server on 127.0.0.1 and of its Unix socket (``$FLEET_HOME/run``);
    0 picks a free one at first start."""

    fleet_model: str | None = None
    """``offline`` (the rule-based support policy, no LLM) or a model name for an OpenAI-compatible
    API. Unset: ``offline`` unless ``OPENAI_API_KEY`` is set, then ``gpt-4.1-mini``."""

    openai_api_key: SecretStr | None = None
    """Key for the OpenAI API or an OpenAI-compatible server."""

    openai_base_url: str | None = None
    """Base URL of an OpenAI-compatible server (chat completions)."""

    fleet_embeddings: Literal["local", "openai"] = "local"
    """``local``: all-MiniLM-L6-v2 (384 dims, offline); ``openai``: text-embedding-3-small."""

    fleet_embedding_batch_size: int = Field(64, ge=1, le=2048)
    """Texts per embedding call (one model forward pass, or one API request)."""

    customer_data_pool_size: int = Field(8, ge=1)
    """Connections in the ``customer-data`` MCP server's own asyncpg pool."""

    customer_data_url: str = "http://127.0.0.1:8765/mcp"
    """Where workers reach the ``customer-data`` MCP server."""

    customer_data_token: SecretStr | None = None
    """The MCP server's bearer token. ``fleet up``/``fleet demo`` generate one when unset."""

    customer_data_rate_limit: float = Field(200.0, ge=0)
    """The MCP server's limit per bearer token: requests per second on average (0: no limit).
    Past it the server answers 429 with Retry-After and the worker's client waits that long."""

    customer_data_rate_burst: int = Field(400, ge=1)
    """Requests per token the MCP server admits at once before the average rate applies."""

    customer_data_max_concurrency: int = Field(64, ge=0)
    """Requests per token the MCP server runs at the same time (0: no limit); more get 429."""

    fleet_mcp_connect_timeout_seconds: float = Field(5.0, gt=0)
    """Agent turns: deadline for connecting a new client to the ``customer-data`` server."""

    fleet_mcp_call_timeout_seconds: float = Field(15.0, gt=0)
    """Agent turns: deadline for one MCP tool call. A call that fails or times out is retried
    on a fresh client (3 attempts in all), then the turn fails and the queue retries it."""

    fleet_mcp_startup_wait_seconds: float = Field(30.0, ge=0)
    """Agent workers: how long a starting worker waits for the ``customer-data`` server (which
    ``fleet up`` starts beside it) before it claims messages anyway, and how long a tool call
    waits for a server that refuses connections (restarting) before the turn fails."""

    fleet_max_input_chars: int = Field(4000, ge=1)
    """Agent turns: a customer message longer than this trips the input guardrail."""

    fleet_skills_dir: Path | None = None
    """Where the skills (``<name>/SKILL.md``) are read from; unset: ``skills/`` in the checkout.
    A worker serves only agents whose skills are all there (and whose tools its MCP server has)."""

    fleet_max_delegation_depth: int = Field(3, ge=0)
    """Agent hierarchies: how deep a chain of delegations (agent -> sub-agent -> ...) may go; a
    delegation beyond it is refused at run time with an error the delegating model sees."""

    fleet_offline_latency_seconds: float = Field(0.0, ge=0)
    """Benchmarks: simulated response time of each call to the offline support policy."""

    fleet_lease_seconds: float = Field(30.0, gt=0)
    """How long a claimed message may go without a heartbeat before another worker takes it."""

    fleet_poll_interval: float = Field(1.0, gt=0)
    """Polling fallback: a worker looks for work this often even without a NOTIFY."""

    fleet_max_attempts: int = Field(5, ge=1)
    """Handler failures before a message is ``dead``."""

    fleet_retry_base_seconds: float = Field(1.0, ge=0)
    """First retry delay; doubles per attempt up to ``FLEET_RETRY_MAX_SECONDS``, with jitter."""

    fleet_retry_max_seconds: float = Field(300.0, ge=0)
    """Upper bound of one retry delay."""

    fleet_shutdown_grace: float = Field(20.0, ge=0)
    """On SIGTERM/SIGINT, how long in-flight messages may run before they are released."""

    fleet_statement_cache_size: int = Field(100, ge=0)
    """asyncpg prepared-statement cache; 0 behind PgBouncer in transaction mode."""

    fleet_gc_young_threshold: int = Field(10_000, ge=0)
    """``fleet worker`` and ``fleet mcp serve``, once ready: freeze what start-up built and
    run the young-generation collection every this many allocations (fleet.gc_policy);
    0 keeps Python's defaults."""

    fleet_max_model_calls: int = Field(12, ge=1)
    """Agent turns: model calls per turn. Past it the message is ``dead`` at once, audited
    ``turn_limit_exceeded`` (an agent's row may set its own)."""

    fleet_max_tool_calls: int = Field(20, ge=1)
    """Agent turns: tool and skill calls per turn; the call over the limit never runs and the
    message is ``dead`` at once, audited ``turn_limit_exceeded``."""

    fleet_token_budget: int = Field(0, ge=0)
    """Agent turns: input + output tokens per turn as the model reports them (the offline model
    reports an estimate, characters / 4); past it the message is ``dead``. 0: no budget."""

    fleet_approval_ttl_seconds: float = Field(86_400.0, gt=0)
    """How long a parked refund waits for a human before it is rejected as expired."""

    fleet_log_level: str = "INFO"
    """Python logging level for fleet processes."""

    fleet_model_prices: str | None = None
    """Estimated-cost metric: US dollars per million input and output tokens, "0.40,1.60".
    Unset: a built-in table of list prices (``fleet.metrics.MODEL_PRICES``); unknown models 0."""

    fleet_metrics_host: str = "0.0.0.0"
    """Address the /metrics endpoints (``--metrics-port``, ``fleet metrics serve``) listen on."""

    fleet_queue_metrics: bool = True
    """Whether ``fleet worker --metrics-port`` also exports the database-derived gauges (queue
    depth, ages, live workers, approvals). Set false on workers when one ``fleet metrics serve``
    per deployment exports them, so they are computed once per scrape, not once per worker."""

    otel_exporter_otlp_endpoint: str | None = None
    """OpenTelemetry collector (OTLP/HTTP, e.g. http://localhost:4318). Set: every process exports
    its spans (needs ``pip install 'pgfleet[otlp]'``); unset: tracing is off at no cost. The other
    standard ``OTEL_*`` variables (``OTEL_SERVICE_NAME``, headers, sampling) apply as usual."""

    @field_validator("fleet_home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def model_name(self) -> str:
        """The model the agent handler uses, with the documented default applied."""
        if self.fleet_model:
            return self.fleet_model
        return "gpt-4.1-mini" if self.openai_api_key else "offline"

    @property
    def embedded(self) -> bool:
        """True when the fleet runs on its embedded PostgreSQL."""
        return not self.database_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
