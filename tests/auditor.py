"""The invariant auditor: run after every scenario (DESIGN §2, STYLE habit 6).

- every posting names an existing operation and joins two existing accounts of its own asset (the
  database no longer checks these keys: migration 0006), and every conversion names its operation;
- each asset's balances, derived from postings, do sum to zero;
- every member's stored balance equals the balance its postings give, and is never negative;
- every issuer's issuance account holds minus the points outstanding;
- every acknowledged mutation is stored exactly once: no idempotency record left pending, and
  each successful issue/redeem request has exactly one operation;
- every conversion's amounts follow DESIGN §1, its operation carries exactly its postings, and
  each merchant's open position equals what its unreversed conversions give;
- every closed cycle's nets and settlements sum to zero, its currency's windows tile time behind
  the clearing fence, and it still holds exactly the operations it counted when it closed;
- every conversion was announced once to each side, and each reversal once to each side;
- the audit chain verifies.
"""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import Connection, Engine, func, select, text

from exchange.domain.conversion import convert_amounts
from exchange.store import audit
from exchange.store.schema import (
    accounts,
    clearing_fences,
    conversions,
    cycle_positions,
    cycles,
    events,
    idempotency,
    members,
    merchant_positions,
    operations,
    postings,
)


def account_balances(engine: Engine) -> dict[int, int]:
    balances: dict[int, int] = defaultdict(int)
    with engine.connect() as conn:
        for account_id, amount in conn.execute(
            select(postings.c.credit_account_id, func.sum(postings.c.amount)).group_by(postings.c.credit_account_id)
        ):
            balances[int(account_id)] += int(amount)
        for account_id, amount in conn.execute(
            select(postings.c.debit_account_id, func.sum(postings.c.amount)).group_by(postings.c.debit_account_id)
        ):
            balances[int(account_id)] -= int(amount)
    return balances


def check_invariants(engine: Engine) -> None:
    balances = account_balances(engine)
    with engine.connect() as conn:
        orphans = conn.execute(
            text(
                "SELECT p.posting_id FROM postings p "
                "WHERE NOT EXISTS (SELECT 1 FROM operations o WHERE o.operation_seq = p.operation_seq) "
                "OR NOT EXISTS (SELECT 1 FROM accounts a WHERE a.account_id = p.debit_account_id) "
                "OR NOT EXISTS (SELECT 1 FROM accounts a WHERE a.account_id = p.credit_account_id)"
            )
        ).all()
        assert not orphans, f"postings naming no operation or no account: {orphans[:5]}"
        unrecorded = conn.execute(
            text(
                "SELECT c.operation_seq FROM conversions c "
                "WHERE NOT EXISTS (SELECT 1 FROM operations o "
                "WHERE o.operation_seq = c.operation_seq AND o.kind = 'convert')"
            )
        ).all()
        assert not unrecorded, f"conversions without their convert operation: {unrecorded[:5]}"
        mismatched = conn.execute(
            text(
                "SELECT p.posting_id FROM postings p "
                "JOIN accounts d ON d.account_id = p.debit_account_id "
                "JOIN accounts c ON c.account_id = p.credit_account_id "
                "WHERE d.asset <> p.asset OR c.asset <> p.asset"
            )
        ).all()
        assert not mismatched, f"postings across assets: {mismatched[:5]}"
        asset_of: dict[int, str] = {
            int(a): str(s) for a, s in conn.execute(select(accounts.c.account_id, accounts.c.asset))
        }
        per_asset: dict[str, int] = defaultdict(int)
        for account_id, balance in balances.items():
            per_asset[asset_of[account_id]] += balance
        assert all(v == 0 for v in per_asset.values()), f"asset sums not zero: {dict(per_asset)}"

        for merchant_id, member_ref, account_id, points in conn.execute(
            select(members.c.merchant_id, members.c.member_ref, members.c.account_id, members.c.points)
        ):
            assert points >= 0, f"negative balance {merchant_id}/{member_ref}: {points}"
            assert balances.get(int(account_id), 0) == points, (
                f"{merchant_id}/{member_ref}: stored {points}, postings give {balances.get(int(account_id), 0)}"
            )

        pending = conn.execute(
            select(func.count()).select_from(idempotency).where(idempotency.c.outcome == "pending")
        ).scalar_one()
        assert pending == 0, f"{pending} idempotency records left pending"
        duplicated = conn.execute(
            select(operations.c.caller, operations.c.request_id, func.count())
            .group_by(operations.c.caller, operations.c.request_id)
            .having(func.count() > 1)
        ).all()
        assert not duplicated, f"operations stored more than once: {duplicated[:5]}"
        ok_points = conn.execute(
            select(idempotency.c.caller, idempotency.c.request_id).where(
                idempotency.c.outcome == "ok",
                idempotency.c.method.in_(
                    [
                        "/pointsx.v1.LedgerService/IssuePoints",
                        "/pointsx.v1.LedgerService/RedeemPoints",
                        "/pointsx.v1.ExchangeService/Convert",
                        "/pointsx.v1.OperatorService/ReverseConversion",
                    ]
                ),
            )
        ).all()
        stored = set(conn.execute(select(operations.c.caller, operations.c.request_id)).all())
        missing = [r for r in ok_points if tuple(r) not in stored]
        assert not missing, f"acknowledged operations missing: {missing[:5]}"
        _check_conversions(conn)
        _check_cycles(conn)
    report = audit.verify(engine)
    assert report.ok, f"audit chain broken at {report.first_broken_seq}: {report.problem}"


def _check_conversions(conn: Connection) -> None:
    derived: dict[str, int] = defaultdict(int)
    cycle_of = cycle_of_operations(conn)
    for row in conn.execute(select(conversions)).mappings():
        amounts = convert_amounts(row["src_points"], row["src_value_micros"], row["dst_value_micros"], row["fee_bps"])
        stored = (row["dst_points"], row["src_cash_micros"], row["fee_micros"], row["dst_cash_micros"])
        assert stored == (amounts.dst_points, amounts.src_cash, amounts.fee, amounts.dst_cash), (
            f"conversion {row['operation_seq']} amounts differ from DESIGN §1: {stored} vs {amounts}"
        )
        legs = sorted(
            conn.execute(
                select(postings.c.asset, postings.c.amount).where(postings.c.operation_seq == row["operation_seq"])
            ).all()
        )
        expected = sorted(
            (asset, amount)
            for asset, amount in (
                (f"points:{row['source_merchant_id']}", amounts.src_points),
                (f"points:{row['destination_merchant_id']}", amounts.dst_points),
                (f"cash:{row['currency']}", amounts.dst_cash),
                (f"cash:{row['currency']}", amounts.platform),
            )
            if amount > 0
        )
        assert [tuple(leg) for leg in legs] == expected, f"conversion {row['operation_seq']} postings {legs}"
        # Open (not yet cleared) amounts make up the position; cleared ones left it at cycle close.
        if cycle_of[row["operation_seq"]] is None:
            derived[row["source_merchant_id"]] -= amounts.src_cash
            derived[row["destination_merchant_id"]] += amounts.dst_cash
        if row["status"] == "reversed":
            reversal = row["reversal_operation_seq"]
            assert reversal is not None, f"reversed conversion {row['operation_seq']} names no reversal"
            reversed_legs = conn.execute(
                select(func.count()).select_from(postings).where(postings.c.operation_seq == reversal)
            ).scalar_one()
            assert reversed_legs == len(expected), f"reversal {reversal} has {reversed_legs} postings"
            if cycle_of[reversal] is None:
                derived[row["source_merchant_id"]] += amounts.src_cash
                derived[row["destination_merchant_id"]] -= amounts.dst_cash
        announced = conn.execute(
            select(events.c.merchant_id, events.c.event_type).where(events.c.conversion_seq == row["operation_seq"])
        ).all()
        want = {(row["source_merchant_id"], "conversion_out"), (row["destination_merchant_id"], "conversion_in")}
        if row["status"] == "reversed":
            want |= {(row["source_merchant_id"], "reversal"), (row["destination_merchant_id"], "reversal")}
        assert sorted(map(tuple, announced)) == sorted(want), f"conversion {row['operation_seq']} events {announced}"
    for merchant_id, position in conn.execute(
        select(merchant_positions.c.merchant_id, merchant_positions.c.open_net_micros)
    ):
        assert position == derived.get(merchant_id, 0), (
            f"{merchant_id}: open position {position}, its conversions give {derived.get(merchant_id, 0)}"
        )


def cycle_of_operations(conn: Connection) -> dict[int, str | None]:
    """The cycle each conversion and reversal belongs to: the one whose window holds its stamp.

    Checks on the way that each currency's windows tile time (each starts at the previous cutoff),
    that its fence is not below its last cutoff, and that every cycle still holds exactly the
    operations it counted when it closed — nothing landed in a closed window afterwards.
    """
    windows: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    counted: dict[str, int] = {}
    for row in conn.execute(select(cycles).order_by(cycles.c.currency, cycles.c.cutoff_ms)).mappings():
        previous = windows[row["currency"]][-1][1] if windows[row["currency"]] else 0
        assert row["window_start_ms"] == previous, f"cycle {row['cycle_id']} window starts at {row['window_start_ms']}"
        windows[row["currency"]].append((int(row["window_start_ms"]), int(row["cutoff_ms"]), row["cycle_id"]))
        counted[row["cycle_id"]] = int(row["operation_count"])
    for currency, spans in windows.items():
        fence = conn.execute(
            select(clearing_fences.c.fenced_before_ms).where(clearing_fences.c.currency == currency)
        ).scalar_one_or_none()
        assert fence is not None and fence >= spans[-1][1], f"{currency} fence {fence} below its last cutoff"
    cycle_of: dict[int, str | None] = {}
    held: dict[str, int] = defaultdict(int)
    for seq, currency, stamp in conn.execute(
        select(operations.c.operation_seq, operations.c.currency, operations.c.created_at_ms).where(
            operations.c.kind.in_(["convert", "reversal"])
        )
    ):
        inside = [cycle for start, cutoff, cycle in windows.get(currency, []) if start <= stamp < cutoff]
        assert len(inside) <= 1, f"operation {seq} in {len(inside)} cycles"
        cycle_of[int(seq)] = inside[0] if inside else None
        if inside:
            held[inside[0]] += 1
    for cycle_id, count in counted.items():
        assert held[cycle_id] == count, (
            f"cycle {cycle_id} counted {count} operations, its window holds {held[cycle_id]}"
        )
    return cycle_of


def _check_cycles(conn: Connection) -> None:
    """Every closed cycle nets to zero and settles to zero, row by row as DESIGN §5 defines."""
    for (cycle_id,) in conn.execute(select(cycles.c.cycle_id)):
        rows = conn.execute(select(cycle_positions).where(cycle_positions.c.cycle_id == cycle_id)).mappings().all()
        assert sum(r["net_micros"] for r in rows) == 0, f"cycle {cycle_id} nets do not sum to zero"
        assert sum(r["settlement_minor"] for r in rows) == 0, f"cycle {cycle_id} settlements do not sum to zero"
        for r in rows:
            expected_net = r["receivable_micros"] - r["payable_micros"] + r["fees_micros"] + r["opening_carry_micros"]
            assert r["net_micros"] == expected_net, f"cycle {cycle_id} {r['merchant_id']}: net {r['net_micros']}"
