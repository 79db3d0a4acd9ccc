"""The seed corpus, generated in code (course Decision 5): customers, orders, policies, cases.

No CSV and no hand-typed rows: each resolved ticket is produced by a scenario *family* (refund
delays, duplicate charges, logins, shipping...) from one of its situations, filled in for a
customer and an order drawn deterministically (``random.Random(SEED)``), so the corpus is the
same on every machine and every run (which is what makes ``fleet seed`` idempotent) while the
cases genuinely differ: different problems, different facts, different resolutions.

Fixed points other parts of the fleet rely on:

* order ``4429``: Sam Rivera's (pro tier) noise-cancelling headphones, $129.00, delivered,
  nothing refunded yet; the course's scenario "I haven't had my refund for order #4429".
* ticket ``4471``: Sam's earlier case "refund not received after two weeks" (order 4402),
  resolved; the course's "write a handoff note for ticket #4471".
* orders for refund scenarios: ``4430`` (enterprise, $2,499.00, above the $500 escalation
  line), ``4431`` (partially refunded: $15.00 of $45.99, so $30.99 is refundable), ``4432``
  (fully refunded: nothing refundable), ``4433`` (small, $19.99).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, Field

SEED = 4471
EPOCH = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)


class SeedCustomer(BaseModel):
    id: str
    email: str
    name: str
    tier: str | None = Field(None, description="None: no tier recorded, read as 'standard'")


class SeedOrder(BaseModel):
    id: str
    customer_id: str
    amount_cents: int
    status: str
    description: str
    placed_at: datetime


class SeedRefund(BaseModel):
    order_id: str
    amount_cents: int
    reason: str
    idempotency_key: str
    created_at: datetime


class SeedTicket(BaseModel):
    id: str
    customer_id: str
    order_id: str | None
    category: str
    subject: str
    body: str
    resolution: str
    created_at: datetime
    resolved_at: datetime

    def case_text(self) -> str:
        """The past case as the library stores and embeds it (one chunk: never split)."""
        return f"{self.subject}\n\nCustomer: {self.body}\n\nResolution: {self.resolution}"


class SeedPolicy(BaseModel):
    slug: str
    title: str
    body: str


class Corpus(BaseModel):
    customers: list[SeedCustomer]
    orders: list[SeedOrder]
    refunds: list[SeedRefund]
    tickets: list[SeedTicket]
    policies: list[SeedPolicy]


# --- customers ------------------------------------------------------------------------------

_PEOPLE = [
    ("Sam", "Rivera", "pro"),
    ("Priya", "Nair", "enterprise"),
    ("Jordan", "Lee", "standard"),
    ("Amara", "Okafor", "standard"),
    ("Diego", "Hernandez", "pro"),
    ("Mei", "Chen", "enterprise"),
    ("Tomas", "Silva", None),
    ("Fatima", "Zahra", "pro"),
    ("Lukas", "Becker", "standard"),
    ("Hannah", "Kim", "enterprise"),
    ("Noah", "Williams", None),
    ("Aisha", "Khan", "pro"),
    ("Oliver", "Brown", "standard"),
    ("Yuki", "Tanaka", "standard"),
]


def _customers() -> list[SeedCustomer]:
    return [
        SeedCustomer(
            id=f"cus-{1001 + i}",
            email=f"{first.lower()}.{last.lower()}@example.com",
            name=f"{first} {last}",
            tier=tier,
        )
        for i, (first, last, tier) in enumerate(_PEOPLE)
    ]


# --- catalog --------------------------------------------------------------------------------

_PRODUCTS = [
    ("noise-cancelling headphones", 12900),
    ("mechanical keyboard", 8900),
    ("4K monitor", 32900),
    ("espresso machine", 45900),
    ("standing desk frame", 27900),
    ("wireless mouse", 2999),
    ("USB-C docking station", 15900),
    ("ergonomic office chair", 38900),
    ("smart thermostat", 17900),
    ("robot vacuum", 34900),
    ("trail running shoes", 12900),
    ("cast-iron skillet set", 7900),
    ("air purifier", 21900),
    ("tablet sleeve", 3499),
]
_CARRIERS = ["UPS", "FedEx", "DHL", "USPS"]
_PLANS = [("Starter", 1200), ("Pro", 4900), ("Team", 19900)]


def _money(cents: int) -> str:
    return f"${cents / 100:,.2f}"


@dataclass
class Situation:
    """One resolved case of a family, written from the facts drawn for it."""

    subject: str
    body: str
    resolution: str
    #: Fraction of the order refunded as part of the resolution (0: nothing refunded).
    refund_fraction: float = 0.0
    #: The order's status after the case (None: leave the generated default).
    order_status: str | None = None


@dataclass
class Facts:
    """What a situation is written from: a customer, an order, a few drawn details."""

    customer: SeedCustomer
    product: str
    amount: int
    order_id: str | None
    days: int
    carrier: str
    last4: str
    plan: str
    plan_price: int

    @property
    def first(self) -> str:
        return self.customer.name.split()[0]


Writer = Callable[[Facts], Situation]


def _refund_delayed() -> list[Writer]:
    return [
        lambda f: Situation(
            f"Refund not received after {f.days} days",
            f"Hi, this is {f.first}. I returned the {f.product} from order #{f.order_id} and was "
            f"told my refund of {_money(f.amount)} was approved, but it has been {f.days} days "
            f"and nothing has shown up on my card. When will I get my money back?",
            "Checked the payment processor: the refund had been created but was stuck in a "
            "pending batch. Pushed it through manually, sent the customer the processor "
            "reference (ARN) to show their bank, and it posted to the card three business "
            "days later. Customer confirmed receipt.",
            1.0,
            "refunded",
        ),
        lambda f: Situation(
            "Refund marked processed but bank shows nothing",
            f"Your email says my refund for order #{f.order_id} was processed {f.days} days ago, "
            f"but my bank statement shows no credit. Is the money lost?",
            "Explained that card refunds take 5-10 business days to appear depending on the "
            "issuing bank. Provided the acquirer reference number so the bank could trace it; "
            "the credit appeared two days later. No re-issue was needed.",
            1.0,
            "refunded",
        ),
        lambda f: Situation(
            "Refund sent to a card that has since expired",
            f"I was refunded for the {f.product} but the card ending {f.last4} it was paid "
            f"with has expired and been replaced. Where does the refund go now?",
            "Confirmed with the card network that refunds to an expired card are forwarded to "
            "the replacement card on the same account. Customer's bank confirmed the credit "
            "landed on the new card within a week.",
            1.0,
            "refunded",
        ),
    ]


def _refund_request() -> list[Writer]:
    return [
        lambda f: Situation(
            f"Return the {f.product} within 30 days",
            f"I bought a {f.product} {f.days} days ago and it doesn't fit my setup. It's unused "
            f"and in the original box. Can I return it for a full refund?",
            "Within the 30-day return window and unused, so eligible. Emailed a prepaid return "
            "label; refunded the full amount to the original payment method once the warehouse "
            "scanned the return.",
            1.0,
            "refunded",
        ),
        lambda f: Situation(
            "Partial refund for a missing accessory",
            f"The {f.product} arrived without the power adapter that the listing says is "
            f"included. I'd rather keep it than send it all back.",
            "Offered a partial refund of 15% instead of a return, which the customer accepted; "
            "refund issued the same day and the listing was flagged to the catalog team.",
            0.15,
            "partially_refunded",
        ),
        lambda f: Situation(
            "Price dropped a week after purchase",
            f"I paid {_money(f.amount)} for the {f.product} and now it's on sale for much "
            f"less. Do you offer price protection?",
            "Our 14-day price-adjustment policy applied: refunded the 20% difference to the "
            "original card. Explained the policy does not cover flash sales from other stores.",
            0.20,
            "partially_refunded",
        ),
    ]


def _duplicate_charge() -> list[Writer]:
    return [
        lambda f: Situation(
            "Charged twice for the same order",
            f"My card ending {f.last4} shows two charges of {_money(f.amount)} for order "
            f"#{f.order_id}. I only placed the order once.",
            "Found a duplicate capture caused by a retried payment request. Voided the second "
            "authorization; because it had already settled, it was reversed as a refund and "
            "the customer received the reversal reference.",
            0.0,
            None,
        ),
        lambda f: Situation(
            "Double charge after the payment page timed out",
            "The checkout page froze and showed an error so I paid again. Now I see both "
            "payments on my statement.",
            "Confirmed two successful payments, one order. Cancelled the orphaned payment; the "
            "pending authorization dropped off the statement within 3 days. Logged the "
            "checkout timeout for engineering.",
            0.0,
            None,
        ),
        lambda f: Situation(
            "Subscription billed twice this month",
            f"I was billed {_money(f.plan_price)} twice for my {f.plan} plan this month.",
            "A plan change created a second billing cycle. Merged the cycles and credited the "
            "duplicate charge back to the card; the next renewal date was corrected.",
            0.0,
            None,
        ),
    ]


def _billing_error() -> list[Writer]:
    return [
        lambda f: Situation(
            "Charge on my statement I don't recognise",
            f"There is a charge of {_money(f.amount)} from your company that I don't remember "
            "making. Was my card stolen?",
            "Walked the customer through the order history: the purchase was made by a family "
            "member on a shared account. Customer recognised it; no dispute filed. Suggested "
            "enabling purchase notifications.",
        ),
        lambda f: Situation(
            "Coupon not applied at checkout",
            "I entered the code WELCOME10 and the page said it was applied, but I was charged "
            "the full price.",
            "The promo had applied to the cart but not to the shipping-adjusted total due to a "
            "known bug. Refunded the 10% discount manually and confirmed the fix is deployed.",
        ),
        lambda f: Situation(
            "Sales tax charged on a tax-exempt account",
            "Our organisation is tax exempt and we uploaded the certificate, but the last "
            "invoice includes sales tax.",
            "The exemption certificate was uploaded after the invoice was generated. Validated "
            "the certificate, re-issued the invoice without tax and credited the tax amount.",
        ),
    ]


def _login() -> list[Writer]:
    return [
        lambda f: Situation(
            "Password reset email never arrives",
            "I've clicked 'forgot password' five times and no email arrives, not even in spam.",
            "The customer's mail provider was rejecting our sender domain. Whitelisted the "
            "address with them, re-sent the reset link, and the customer logged in and set a "
            "new password.",
        ),
        lambda f: Situation(
            "Account locked after too many login attempts",
            "It says my account is locked for security reasons. I just mistyped my password a "
            "few times.",
            "Verified identity with the email on file and the last order number, unlocked the "
            "account, and recommended a password manager. Lockout resets automatically after "
            "30 minutes otherwise.",
        ),
        lambda f: Situation(
            "Can't sign in after changing my email address",
            "I changed my email in settings and now neither the old nor the new address works "
            "to sign in.",
            "The email change was pending confirmation, so neither address was active. "
            "Confirmed the new address manually after verifying identity; sign-in works with "
            "the new email.",
        ),
        lambda f: Situation(
            "Signed out on every device and session keeps expiring",
            "The app logs me out every few minutes on my phone and laptop.",
            "A stale session cookie from an old browser extension conflicted with the new "
            "login flow. Cleared sessions server-side and had the customer remove the "
            "extension; sessions now persist.",
        ),
    ]


def _two_factor() -> list[Writer]:
    return [
        lambda f: Situation(
            "Lost my phone with the authenticator app",
            "My phone was stolen and my two-factor codes were on it. I can't get into my "
            "account.",
            "Ran the 2FA recovery process: identity verified via government ID and the card "
            f"ending {f.last4}; reset two-factor after the 24-hour security hold and the "
            "customer enrolled a new device.",
        ),
        lambda f: Situation(
            "SMS verification codes not arriving while abroad",
            "I'm travelling and the text message codes never arrive, so I can't log in.",
            "International SMS delivery to the customer's roaming carrier was failing. Helped "
            "them switch to authenticator-app codes using a backup code; SMS issue reported "
            "to the messaging provider.",
        ),
        lambda f: Situation(
            "Backup codes rejected at sign-in",
            "I saved my two-factor backup codes when I set up the account, but every one I "
            "type is rejected.",
            "The codes had been regenerated during a later security review, invalidating the "
            "saved set. After identity verification, issued a one-time sign-in link and the "
            "customer generated and stored a fresh set of codes.",
        ),
    ]


def _shipping_delay() -> list[Writer]:
    return [
        lambda f: Situation(
            "Package stuck in transit for a week",
            f"My {f.product} (order #{f.order_id}) has shown 'in transit' with {f.carrier} "
            f"for {f.days} days with no movement.",
            f"Opened a trace with {f.carrier}: the parcel was held at a sorting hub after a "
            "label scan failure. It was relabelled and delivered two days later; shipping fee "
            "refunded as a courtesy.",
        ),
        lambda f: Situation(
            "Tracking number not updating",
            f"The tracking link for order #{f.order_id} still says 'label created' after "
            f"{f.days} days.",
            "The warehouse had missed the pickup. Shipped the order the same day with express "
            "delivery at no extra cost and sent the new tracking number.",
        ),
        lambda f: Situation(
            "Delivery date slipped twice",
            f"The estimated delivery for my {f.product} has moved twice. I need it before a "
            "trip on Friday.",
            "Item was backordered at the regional warehouse. Re-routed from another warehouse "
            "with overnight shipping; delivered Thursday.",
        ),
        lambda f: Situation(
            "Unexpected customs fee on delivery",
            f"The courier asked me for a customs fee before handing over my {f.product}. Your "
            "site said duties were included.",
            "The shipment had been sent without the duties-paid flag. Reimbursed the customs "
            "fee the customer paid on the receipt they sent and fixed the export setting for "
            "their country.",
        ),
    ]


def _lost_package() -> list[Writer]:
    return [
        lambda f: Situation(
            "Marked as delivered but never received",
            f"{f.carrier} says my package was delivered yesterday but there is nothing at my "
            "door and the neighbours haven't seen it.",
            f"Carrier GPS showed the drop at a different address. Filed a claim with "
            f"{f.carrier} and shipped a replacement {f.product} immediately; the customer kept "
            "the replacement when the original was never found.",
            0.0,
            "delivered",
        ),
        lambda f: Situation(
            "Package returned to sender because of an address error",
            "I got a notice that my order is being returned to you. The address was missing my "
            "apartment number.",
            "Updated the address with the apartment number and re-shipped as soon as the "
            "return arrived; the customer's address book entry was corrected.",
        ),
        lambda f: Situation(
            f"{f.carrier} lost the parcel",
            f"{f.carrier} emailed me that my parcel for order #{f.order_id} was lost in their "
            "network. What happens now?",
            f"{f.carrier} confirmed the loss. Sent a replacement {f.product} by express the "
            "same day and filed the carrier claim ourselves; no action needed from the customer.",
        ),
    ]


def _damaged() -> list[Writer]:
    return [
        lambda f: Situation(
            f"{f.product.capitalize()} arrived cracked",
            f"The {f.product} arrived with a cracked casing; the box was crushed on one side. "
            "Photos attached.",
            "Photos confirmed shipping damage. Sent a replacement by express shipping and a "
            "prepaid label to return the damaged unit; filed a damage claim with the carrier.",
        ),
        lambda f: Situation(
            "Item arrived broken with parts missing",
            f"My {f.product} came with a snapped bracket and two screws missing, so I can't "
            "assemble it.",
            "Shipped the missing hardware kit and a new bracket overnight from spare parts "
            "instead of replacing the whole unit; the customer confirmed assembly worked.",
        ),
        lambda f: Situation(
            "Box arrived soaking wet",
            f"The box my {f.product} came in was soaked through from rain. The item seems to "
            "power on; should I keep using it?",
            "Advised not to use an electrical item that may have taken on water. Sent a "
            "replacement and a prepaid return label; the wet unit was inspected and scrapped.",
        ),
    ]


def _wrong_item() -> list[Writer]:
    return [
        lambda f: Situation(
            "Received the wrong colour",
            f"I ordered the {f.product} in black and received white.",
            "Picking error at the warehouse. Sent the correct colour and let the customer keep "
            "the wrong one, since return shipping would have cost more than the item margin.",
        ),
        lambda f: Situation(
            "Got someone else's order in my box",
            f"The box for order #{f.order_id} had a packing slip with another person's name and "
            "completely different items.",
            "Two orders were swapped at packing. Arranged a courier pickup of the wrong items, "
            "shipped the customer's order express, and notified the other customer.",
        ),
    ]


def _subscription() -> list[Writer]:
    return [
        lambda f: Situation(
            "Cancel my subscription before it renews",
            f"Please cancel my {f.plan} plan. It renews in two days and I don't want to be "
            "charged again.",
            "Cancelled the subscription effective at the end of the current period and turned "
            "off auto-renew; the customer keeps access until then and received the "
            "confirmation email.",
        ),
        lambda f: Situation(
            "Charged after I cancelled",
            f"I cancelled my {f.plan} plan last month but was still charged "
            f"{_money(f.plan_price)} this month.",
            "The cancellation had been started but not confirmed in the app. Completed the "
            "cancellation and refunded the renewal charge in full.",
        ),
        lambda f: Situation(
            "Pause subscription while travelling",
            f"I'll be away for three months. Can I pause my {f.plan} plan instead of "
            "cancelling?",
            "Set a three-month pause: no charges during the pause and the plan resumes "
            "automatically with the same price. Customer received the resume date by email.",
        ),
    ]


def _plan_change() -> list[Writer]:
    return [
        lambda f: Situation(
            "Upgrade mid-cycle: how is it charged?",
            f"If I upgrade from {f.plan} to the next plan today, am I charged the full price "
            "again?",
            "Explained proration: the upgrade charges only the difference for the remaining "
            "days of the cycle. Performed the upgrade; the invoice showed the prorated amount.",
        ),
        lambda f: Situation(
            "Reduce the number of seats on our team plan",
            "We have 25 seats but only 18 people now. How do we reduce seats and get credit?",
            "Reduced seats to 18 effective immediately; the unused seats were credited "
            "against the next invoice, as the annual contract does not allow cash refunds.",
        ),
    ]


def _account() -> list[Writer]:
    return [
        lambda f: Situation(
            "Delete my account and personal data",
            "Under GDPR I want my account and all my personal data deleted.",
            "Verified identity, confirmed no open orders, and submitted the erasure request. "
            "Data deleted within 30 days; order records kept only as the law requires for tax, "
            "which was explained to the customer.",
        ),
        lambda f: Situation(
            "Export all my order history",
            "I need a copy of all my orders and invoices for my accountant.",
            "Generated a data export (CSV of orders plus PDF invoices) from the account "
            "settings and sent the download link, valid for 7 days.",
        ),
    ]


def _invoice() -> list[Writer]:
    return [
        lambda f: Situation(
            "Need a VAT invoice with our company name",
            f"The invoice for order #{f.order_id} only shows my name. Our finance team needs "
            "the company name and VAT number on it.",
            "Added the company name and VAT number to the billing profile and re-issued the "
            "invoice as a VAT invoice with the same invoice number suffixed -R1.",
        ),
        lambda f: Situation(
            "Receipt for an expense report",
            "I need a receipt showing the payment method and date for my expense claim.",
            "Sent the payment receipt (payment method, last four digits, date, amount) from "
            "the billing history; explained where to download receipts in future.",
        ),
    ]


def _address_change() -> list[Writer]:
    return [
        lambda f: Situation(
            "Change the shipping address after ordering",
            f"I just placed order #{f.order_id} but I'm moving next week. Can you send it to my "
            "new address?",
            "The order had not shipped yet, so updated the shipping address after verifying "
            "the account email; the label was reprinted before pickup.",
        ),
        lambda f: Situation(
            "Promo code says expired",
            "The code from your newsletter says it has expired, but the email arrived "
            "yesterday.",
            "The campaign end date had been set a week early by mistake. Applied the discount "
            "manually to the customer's order and corrected the campaign.",
        ),
    ]


#: category -> situations. The category is what the ranking tests compare.
FAMILIES: dict[str, Callable[[], list[Writer]]] = {
    "refund_delayed": _refund_delayed,
    "refund_request": _refund_request,
    "duplicate_charge": _duplicate_charge,
    "billing_error": _billing_error,
    "login": _login,
    "two_factor": _two_factor,
    "shipping_delay": _shipping_delay,
    "lost_package": _lost_package,
    "damaged_goods": _damaged,
    "wrong_item": _wrong_item,
    "subscription": _subscription,
    "plan_change": _plan_change,
    "account_data": _account,
    "invoice": _invoice,
    "order_change": _address_change,
}
#: Families whose cases concern a physical order (they get an order row of their own).
_ORDER_FAMILIES = {
    "refund_delayed", "refund_request", "duplicate_charge", "billing_error", "shipping_delay",
    "lost_package", "damaged_goods", "wrong_item", "invoice", "order_change",
}


def _fixed(customers: dict[str, SeedCustomer]) -> tuple[list[SeedOrder], list[SeedRefund]]:
    """The orders the scenarios and tests name by number."""
    sam, priya, jordan, amara = (customers[f"cus-100{i}"] for i in (1, 2, 3, 4))
    day = timedelta(days=1)
    orders = [
        SeedOrder(id="4402", customer_id=sam.id, amount_cents=8900, status="refunded",
                  description="mechanical keyboard", placed_at=EPOCH + 60 * day),
        SeedOrder(id="4429", customer_id=sam.id, amount_cents=12900, status="delivered",
                  description="noise-cancelling headphones", placed_at=EPOCH + 110 * day),
        SeedOrder(id="4430", customer_id=priya.id, amount_cents=249900, status="paid",
                  description="annual Team plan, 25 seats", placed_at=EPOCH + 112 * day),
        SeedOrder(id="4431", customer_id=jordan.id, amount_cents=4599, status="partially_refunded",
                  description="cast-iron skillet set", placed_at=EPOCH + 113 * day),
        SeedOrder(id="4432", customer_id=amara.id, amount_cents=3499, status="refunded",
                  description="tablet sleeve", placed_at=EPOCH + 114 * day),
        SeedOrder(id="4433", customer_id=amara.id, amount_cents=1999, status="delivered",
                  description="phone charging cable", placed_at=EPOCH + 115 * day),
    ]
    refunds = [
        SeedRefund(order_id="4402", amount_cents=8900, idempotency_key="seed:order:4402",
                   reason="Returned unopened; refund re-pushed after a delay (ticket 4471)",
                   created_at=EPOCH + 75 * day),
        SeedRefund(order_id="4431", amount_cents=1500, idempotency_key="seed:order:4431",
                   reason="Goodwill credit for a late delivery",
                   created_at=EPOCH + 118 * day),
        SeedRefund(order_id="4432", amount_cents=3499, idempotency_key="seed:order:4432",
                   reason="Wrong size ordered; returned within 30 days",
                   created_at=EPOCH + 119 * day),
    ]
    return orders, refunds


def _sam_4471(sam: SeedCustomer) -> SeedTicket:
    """The course's ticket #4471: Sam's refund, delayed two weeks."""
    created = EPOCH + 70 * timedelta(days=1)
    return SeedTicket(
        id="4471",
        customer_id=sam.id,
        order_id="4402",
        category="refund_delayed",
        subject="Refund delayed two weeks",
        body="Hi, this is Sam. I returned my mechanical keyboard from order #4402 and the refund "
        "of $89.00 still hasn't arrived after two weeks. I'm getting frustrated; please tell "
        "me where my money is.",
        resolution="The refund was approved but stuck in the payment processor's pending queue. "
        "Re-pushed it, sent Sam the acquirer reference number, and followed up: the $89.00 "
        "posted to the card five days later. Sam is pro tier, so the case was also flagged to "
        "the payments team to find why refunds stall.",
        created_at=created,
        resolved_at=created + timedelta(days=5),
    )


def build_corpus() -> Corpus:
    """The whole seed corpus; the same on every call."""
    rng = random.Random(SEED)
    customers = _customers()
    by_id = {c.id: c for c in customers}
    orders, refunds = _fixed(by_id)
    tickets: list[SeedTicket] = [_sam_4471(by_id["cus-1001"])]

    next_order = 4300
    next_ticket = iter(i for i in range(4440, 4600) if i != 4471)
    case_number = 0
    for category, family in FAMILIES.items():
        for writer in family():
            customer = rng.choice(customers)
            product, price = rng.choice(_PRODUCTS)
            plan, plan_price = rng.choice(_PLANS)
            order_id: str | None = None
            if category in _ORDER_FAMILIES:
                order_id = str(next_order)
                next_order += 1
            facts = Facts(
                customer=customer,
                product=product,
                amount=price,
                order_id=order_id,
                days=rng.choice([9, 12, 16, 19, 23]),
                carrier=rng.choice(_CARRIERS),
                last4=f"{rng.randint(0, 9999):04d}",
                plan=plan,
                plan_price=plan_price,
            )
            situation = writer(facts)
            created = EPOCH + timedelta(days=2 * case_number, hours=rng.randint(0, 9))
            case_number += 1
            if order_id is not None:
                orders.append(SeedOrder(
                    id=order_id, customer_id=customer.id, amount_cents=price,
                    status=situation.order_status or "delivered", description=product,
                    placed_at=created - timedelta(days=facts.days),
                ))
                if situation.refund_fraction > 0:
                    refunds.append(SeedRefund(
                        order_id=order_id,
                        amount_cents=max(1, round(price * situation.refund_fraction)),
                        reason=situation.subject,
                        idempotency_key=f"seed:order:{order_id}",
                        created_at=created + timedelta(days=2),
                    ))
            tickets.append(SeedTicket(
                id=str(next(next_ticket)),
                customer_id=customer.id,
                order_id=order_id,
                category=category,
                subject=situation.subject,
                body=situation.body,
                resolution=situation.resolution,
                created_at=created,
                resolved_at=created + timedelta(days=rng.randint(1, 6), hours=rng.randint(1, 8)),
            ))
    return Corpus(customers=customers, orders=orders, refunds=refunds, tickets=tickets,
                  policies=POLICIES)


# --- policy library -------------------------------------------------------------------------

POLICIES = [
    SeedPolicy(
        slug="refund-policy",
        title="Refund policy",
        body="""# Refund policy

Customers may return most physical items within 30 days of delivery for a full refund to the
original payment method, provided the item is unused and in its original packaging. Opened
items may be refunded at the agent's discretion when they are faulty or were misdescribed.

## Eligibility

Digital goods, gift cards and items marked final sale are not refundable unless they are
defective. Subscriptions are refunded only for charges made after a confirmed cancellation or
for a duplicate charge. A refund never exceeds what the customer paid for the order, minus any
refunds already issued on it.

## How long a refund takes

Once a refund is issued it normally reaches the customer's card within 5 to 10 business days;
the exact time depends on the issuing bank. If a customer reports that an issued refund has not
arrived after 10 business days, give them the acquirer reference number (ARN) from the payment
processor so their bank can trace it, and check the processor for refunds stuck in a pending
batch. A refund that is still missing after 15 business days is escalated to the payments team.

## Partial refunds and goodwill

Agents may offer a partial refund instead of a return when an accessory is missing, the item is
cosmetically damaged, or the price dropped within 14 days of purchase (price adjustment).
Goodwill credits for late deliveries are limited to the shipping fee.

## Approval

Every refund issued by an AI worker is paused for human approval before money moves. Refunds
above $500 additionally need a team lead's sign-off, and refunds on enterprise accounts are
handled by the customer's account manager. Always record the reason in plain language; it is
shown to the approver and kept in the audit trail.
""",
    ),
    SeedPolicy(
        slug="shipping-policy",
        title="Shipping and delivery policy",
        body="""# Shipping and delivery policy

Standard shipping takes 3 to 7 business days and express shipping 1 to 2 business days after
the order leaves the warehouse. Orders placed before 2 pm ship the same day.

## Delayed parcels

If tracking has not changed for 5 business days, open a trace with the carrier. If the trace
shows the parcel is held or lost, ship a replacement by express at no cost rather than waiting
for the carrier's investigation, and refund the shipping fee as a courtesy.

## Delivered but not received

Ask the customer to check with neighbours and around the property, then wait one business day,
since carriers sometimes mark parcels delivered early. After that, file a carrier claim and send
a replacement. Do not ask the customer to file the claim themselves.

## Damaged or wrong items

Ask for a photo of the item and the box. Damaged items are replaced, or refunded if the customer
prefers; the customer returns the damaged unit with a prepaid label only when its value exceeds
$50. Wrong items caused by a picking error are replaced and usually kept by the customer.

## Address changes

The shipping address can be changed until the label is printed. After that the parcel must be
redirected through the carrier, which may add a day.
""",
    ),
    SeedPolicy(
        slug="account-security",
        title="Account access and security",
        body="""# Account access and security

Never reveal whether an email address has an account, and never change an account's email,
password or two-factor settings without verifying the person's identity first.

## Verifying identity

Ask for two of: the email address on file, the last order number, the last four digits of the
card used for that order, or the billing postcode. For two-factor resets, also require a photo
of a government ID, and apply a 24-hour security hold before the reset takes effect.

## Password resets and lockouts

Reset emails expire after one hour. When they do not arrive, check whether the customer's mail
provider is rejecting our sender domain before re-sending. Accounts lock for 30 minutes after
ten failed sign-in attempts; agents may unlock sooner after verifying identity.

## Personal data requests

Data export requests are fulfilled from account settings within 7 days. Erasure requests are
completed within 30 days; order and invoice records are kept for the period tax law requires,
and the customer is told so.
""",
    ),
    SeedPolicy(
        slug="subscriptions-billing",
        title="Subscriptions and billing",
        body="""# Subscriptions and billing

Plans renew automatically at the start of each billing period. Customers can cancel at any time;
cancellation takes effect at the end of the current period and access continues until then.

## Upgrades, downgrades and seats

Upgrades are prorated: the customer pays the difference for the rest of the cycle. Downgrades
and seat reductions take effect immediately and are credited against the next invoice; annual
contracts are not refunded in cash.

## Duplicate and unexpected charges

A duplicate charge from a retried payment is voided if it is still an authorization, and
reversed as a refund if it has settled. For a charge the customer does not recognise, review the
order history with them first; if it is fraud, lock the account, refund the charge and ask the
customer to contact their bank.

## Invoices and tax

VAT invoices can be re-issued with a company name and VAT number. Tax-exempt organisations must
upload a valid certificate; tax already charged is credited once the certificate is validated.
""",
    ),
    SeedPolicy(
        slug="escalation-policy",
        title="When to escalate to a human",
        body="""# When to escalate to a human

Escalate to a tier-2 agent, with a handoff note covering the customer, the issue, what was
tried and the recommended team, when any of these is true: the customer is on the pro or
enterprise tier and the issue is unresolved after one round of investigation; the customer is
clearly upset; the issue involves billing above $500 or a refund decision; or the customer asks
for a human.

## Which team

Refunds, chargebacks and payment processor problems go to the payments team. Lost or damaged
parcels go to logistics. Sign-in, two-factor and data requests go to the trust and safety team.
Enterprise accounts always go to their account manager.

## Service levels

Enterprise escalations are answered within 2 business hours, pro within 8, standard within 24.
""",
    ),
]
