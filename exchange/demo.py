"""`pointsx demo`: the network end to end on a throwaway SQLite database, told as tables.

It runs everything for real — a hub on a real port, signed calls through the merchant SDK — and
checks what it shows: any step that does not come out as expected exits non-zero with a message.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table

from exchange.background import BackgroundHub
from exchange.config import init_data_dir, load_key
from exchange.domain.conversion import convert_amounts
from exchange.domain.units import format_micros
from exchange.operator_client import OperatorClient
from exchange.runtime import open_hub
from exchange.store import audit
from merchant_sdk import (
    MerchantClient,
    StatementVerificationError,
    common_pb2,
    errors,
    new_request_id,
    verify_statement,
)
from merchant_sdk.signing import public_key_bytes

console = Console()

MERCHANTS = [
    # id, name, point value in micros of CNY
    ("brew", "Brew & Co. coffee", 10_000),  # 1 point = 0.01 CNY
    ("skyway", "Skyway Airlines", 50_000),  # 1 mile = 0.05 CNY
    ("pageturn", "Pageturn Books", 2_000),  # 1 point = 0.002 CNY
]


class DemoFailure(Exception):
    """A step did not produce what the demo expects."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise DemoFailure(what)


def _step(title: str) -> None:
    console.rule(f"[bold cyan]{title}")


def run_demo(*, keep: bool = False) -> int:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="pointsx-demo-"))
    background: BackgroundHub | None = None
    try:
        cfg = init_data_dir(workdir / "data", name="pointsx-demo")
        background = BackgroundHub(open_hub(cfg, migrate_now=True))
        _story(background, load_key(cfg.operator_key_path))
    except (DemoFailure, errors.PointsxError) as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        return 1
    finally:
        if background is not None:
            background.stop()
        if keep:
            console.print(f"data directory kept at {workdir / 'data'}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    console.print(f"[bold green]demo complete[/] in {time.monotonic() - started:.1f} s")
    return 0


def _story(background: BackgroundHub, operator_key: Ed25519PrivateKey) -> None:
    target = background.target
    _step(f"1. a hub serving on {target} (SQLite, throwaway)")
    clients: dict[str, MerchantClient] = {}
    with OperatorClient(target, operator_key) as operator:
        info_client = MerchantClient(target, "nobody", Ed25519PrivateKey.generate())
        info = info_client.get_network_info()
        info_client.close()
        console.print(f"network [bold]{info.hub_name}[/], hub key {info.hub_keys[0].key_id}, version {info.version}")

        _step("2. the operator admits three merchants")
        table = Table("merchant", "name", "currency", "one point is worth", "key id")
        for merchant_id, name, value_micros in MERCHANTS:
            key = Ed25519PrivateKey.generate()
            admitted = operator.register_merchant(
                merchant_id,
                name,
                "CNY",
                value_micros,
                public_key_bytes(key.public_key()),
                net_debit_cap_micros=5_000_000_000,
            )
            clients[merchant_id] = MerchantClient(target, merchant_id, key)
            table.add_row(
                merchant_id, name, "CNY", format_micros(admitted.point_value.value_micros), admitted.keys[0].key_id
            )
        console.print(table)
    try:
        _members_and_points(clients)
        _conversions(clients)
        with OperatorClient(target, operator_key) as operator:
            _clearing(operator, clients)
    finally:
        for client in clients.values():
            client.close()
    _step("8. the audit log")
    report = audit.verify(background.hub.engine)
    expect(report.ok, f"audit chain broken at {report.first_broken_seq}: {report.problem}")
    console.print(f"hash chain intact over {report.records} signed state changes")


def _members_and_points(clients: dict[str, MerchantClient]) -> None:
    brew, skyway, pageturn = clients["brew"], clients["skyway"], clients["pageturn"]
    _step("3. members enrol and link their accounts across brands")
    for client, refs in ((brew, ["alice", "bob"]), (skyway, ["A-1001", "B-2002"]), (pageturn, ["reader-7"])):
        for ref in refs:
            client.enroll_member(ref)
    code = brew.create_link_code("alice")
    console.print(f"brew gives alice the one-time link code [bold]{code.code}[/]; she types it into Skyway's app")
    skyway.redeem_link_code("A-1001", code.code)
    code = brew.create_link_code("alice")
    pageturn.redeem_link_code("reader-7", code.code)
    linked = brew.get_balance("alice").linked_merchant_ids
    expect(list(linked) == ["pageturn", "skyway"], f"alice should be linked to pageturn and skyway, got {list(linked)}")
    console.print(f"alice@brew is now linked with: {', '.join(linked)}")

    _step("4. members earn and spend")
    brew.issue_points("alice", 1_200, memo="12 lattes")
    skyway.issue_points("A-1001", 3_000, memo="SHA-CTU flight")
    pageturn.issue_points("reader-7", 5_000, memo="book club")
    brew.issue_points("bob", 300, memo="espresso")
    spent = brew.redeem_points("alice", 200, memo="free cake")
    expect(spent.balance_points == 1_000, f"alice should hold 1000 after spending 200, has {spent.balance_points}")
    request_id = new_request_id()
    first = skyway.redeem_points("A-1001", 500, memo="seat upgrade", request_id=request_id)
    again = skyway.redeem_points("A-1001", 500, memo="seat upgrade", request_id=request_id)
    expect(first.operation_id == again.operation_id, "a retried request must return the same operation")
    console.print(f"a retried redeem (same request_id) returned the same operation {first.operation_id}: spent once")

    _step("5. a refusal, with its reason")
    try:
        brew.redeem_points("bob", 1_000, memo="too much")
    except errors.InsufficientPoints as refusal:
        console.print(f"bob tries to spend 1000 of his 300 points -> [yellow]{refusal.reason}[/]: {refusal.message}")
    else:
        raise DemoFailure("an overdraft was accepted")

    table = Table("merchant", "member", "points", "worth (CNY)", "linked with")
    values = {m: v for m, _n, v in MERCHANTS}
    expected = {
        ("brew", "alice"): 1_000,
        ("brew", "bob"): 300,
        ("skyway", "A-1001"): 2_500,
        ("pageturn", "reader-7"): 5_000,
    }
    for (merchant_id, ref), points in expected.items():
        balance = clients[merchant_id].get_balance(ref)
        expect(balance.points == points, f"{merchant_id}/{ref} should hold {points}, holds {balance.points}")
        table.add_row(
            merchant_id,
            ref,
            str(balance.points),
            format_micros(balance.points * values[merchant_id]),
            ", ".join(balance.linked_merchant_ids),
        )
    console.print(table)


def _conversions(clients: dict[str, MerchantClient]) -> None:
    brew, skyway, pageturn = clients["brew"], clients["skyway"], clients["pageturn"]
    values = {m: v for m, _n, v in MERCHANTS}
    _step("6. members convert points between brands")
    for source, destination in (("brew", "skyway"), ("brew", "pageturn"), ("skyway", "brew")):
        clients[source].set_route(destination, "outbound")
        route = clients[destination].set_route(source, "inbound")
        expect(route.state == common_pb2.ROUTE_STATE_OPEN, f"route {source} -> {destination} should be open")
    console.print("routes open (each opened by its source and accepted by its destination, network fee 100 bps): "
                  "brew -> skyway, brew -> pageturn, skyway -> brew")  # fmt: skip

    quote = brew.quote_conversion("alice", "skyway", src_points=500)
    console.print(
        f"alice asks brew for a quote: 500 brew points -> [bold]{quote.dst_points}[/] skyway miles "
        f"(fee {format_micros(quote.fee.micros)} CNY, valid until {quote.expires_at.ToDatetime():%H:%M:%S} UTC)"
    )
    done = [brew.convert("alice", "skyway", quote_id=quote.quote_id)]
    pageturn_quote = brew.quote_conversion("alice", "pageturn", dst_points=1_000)
    console.print(f"to get 1000 pageturn points alice needs at least {pageturn_quote.src_points} brew points")
    done.append(brew.convert("alice", "pageturn", pageturn_quote.src_points, min_dst_points=1_000))
    done.append(skyway.convert("A-1001", "brew", 333))

    table = Table("#", "route", "points out -> in", "source owes", "destination is owed", "platform (CNY)")
    for conversion in done:
        amounts = convert_amounts(
            conversion.src_points,
            values[conversion.source_merchant_id],
            values[conversion.destination_merchant_id],
            conversion.fee_bps,
        )
        expect(
            (conversion.dst_points, conversion.dst_cash.micros, conversion.platform.micros)
            == (amounts.dst_points, amounts.dst_cash, amounts.platform),
            f"conversion {conversion.conversion_id} does not follow the network's arithmetic",
        )
        expect(
            conversion.src_cash.micros == conversion.dst_cash.micros + conversion.platform.micros,
            "value was created or lost in a conversion",
        )
        table.add_row(
            str(int(conversion.conversion_id.removeprefix("op_"))),
            f"{conversion.source_merchant_id} -> {conversion.destination_merchant_id}",
            f"{conversion.src_points} -> {conversion.dst_points}",
            format_micros(conversion.src_cash.micros),
            format_micros(conversion.dst_cash.micros),
            format_micros(conversion.platform.micros),
        )
    console.print(table)
    expect(pageturn.get_balance("reader-7").points >= 6_000, "reader-7 should have received 1000 pageturn points")

    try:
        pageturn.convert("reader-7", "skyway", 1_000)
    except errors.RouteClosed as refusal:
        console.print(f"pageturn -> skyway has no agreed route -> [yellow]{refusal.reason}[/]: {refusal.message}")
    else:
        raise DemoFailure("a conversion ran on a route nobody opened")

    table = Table("merchant", "member", "points after conversions")
    for merchant_id, ref in (("brew", "alice"), ("skyway", "A-1001"), ("pageturn", "reader-7")):
        table.add_row(merchant_id, ref, str(clients[merchant_id].get_balance(ref).points))
    console.print(table)


def _clearing(operator: OperatorClient, clients: dict[str, MerchantClient]) -> None:
    _step("7. clearing: the operator closes the cycle; merchants verify and acknowledge their statements")
    cycle = operator.close_cycle("CNY")
    table = Table("merchant", "payable", "receivable", "net (CNY)", "settles (minor units)", "carry (micros)",
                  title=f"cycle {cycle.cycle_id}: {cycle.operation_count} operations")  # fmt: skip
    for p in cycle.positions:
        table.add_row(
            p.merchant_id,
            format_micros(p.payable_micros),
            format_micros(p.receivable_micros + p.fees_micros),
            format_micros(p.net_micros),
            str(p.settlement_minor),
            str(p.closing_carry_micros),
        )
    console.print(table)
    expect(sum(p.net_micros for p in cycle.positions) == 0, "the cycle's nets do not sum to zero")
    expect(sum(p.settlement_minor for p in cycle.positions) == 0, "the cycle's settlements do not sum to zero")
    console.print("nets and settlements sum to exactly zero; sub-cent remainders carry into the next cycle")

    any_client = next(iter(clients.values()))
    hub_keys = {k.key_id: bytes(k.public_key) for k in any_client.get_network_info().hub_keys}
    for merchant_id, client in clients.items():
        envelope = client.get_statement(cycle.cycle_id)
        items = list(client.iter_statement_items(cycle.cycle_id))
        try:
            verified = verify_statement(envelope, hub_keys, items)
        except StatementVerificationError as exc:
            raise DemoFailure(f"{merchant_id}'s statement does not verify: {exc}") from None
        client.acknowledge_statement(cycle.cycle_id, bytes(envelope.statement_json))
        console.print(
            f"{merchant_id}: statement signed by hub key {envelope.key_id} verified, {len(items)} items hash to "
            f"items_sha256, net {format_micros(int(verified.fields['net']))} CNY — acknowledged"
        )
    acknowledged = operator.get_cycle(cycle.cycle_id)
    expect(
        all(p.acknowledged for p in acknowledged.positions if p.merchant_id != "platform"),
        "every merchant's acknowledgement should be recorded",
    )
