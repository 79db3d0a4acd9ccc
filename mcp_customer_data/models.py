"""What the customer-data tools return: typed, so the model gets a schema and a stable shape.

Money is always integer cents with its currency, never a float.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, Field


class CustomerInfo(BaseModel):
    customer_id: str
    email: str
    name: str
    tier: str = Field(description="standard, pro or enterprise (standard when none is recorded)")
    open_ticket_count: int


class OrderSummary(BaseModel):
    order_id: str
    amount_cents: int
    currency: str
    status: str
    description: str
    placed_at: datetime


class CustomerWithOrders(CustomerInfo):
    recent_orders: list[OrderSummary] = Field(description="latest orders first, at most 5")


class RefundRecord(BaseModel):
    refund_id: UUID
    amount_cents: int
    reason: str
    created_at: datetime


class OrderInfo(BaseModel):
    order_id: str
    customer_id: str
    customer_email: str
    customer_name: str
    customer_tier: str
    amount_cents: int
    currency: str
    status: str
    description: str
    placed_at: datetime
    refunded_cents: int = Field(description="sum of the refunds issued on this order so far")
    refundable_cents: int = Field(description="what issue_refund may still refund on this order")
    refunds: list[RefundRecord]


class SimilarTicket(BaseModel):
    ticket_id: str
    subject: str
    category: str
    customer_message: str
    resolution: str | None
    order_id: str | None
    resolved_at: datetime | None
    distance: float = Field(description="cosine distance: lower is more similar")


class SimilarTickets(BaseModel):
    matches: list[SimilarTicket] = Field(description="nearest first")
    limit_applied: int
    model: str = Field(description="the embedding model the search used")


class RefundIssued(BaseModel):
    refund_id: UUID
    order_id: str
    amount_cents: int
    reason: str
    created_at: datetime
    order_status: str = Field(description="the order's status after this refund")
    refunded_cents: int = Field(description="total refunded on the order, this refund included")
    refundable_cents: int = Field(description="what is still refundable on the order")
    replayed: bool = Field(
        description="true when this call repeated an earlier one (same idempotency key): the "
        "first refund is returned and nothing new was written"
    )
