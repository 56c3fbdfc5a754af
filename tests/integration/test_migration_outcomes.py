"""Migrations 0005 and 0006 carry a network made by the previous schema over — on SQLite and PostgreSQL.

A network is built and converted through the SDK. Its idempotency records are then put in the
shape the previous hub stored: the reply's bytes in `response`, no domain `result`. The database
goes down to 0004 (postings' and conversions' foreign keys back, `result` gone) and up to head
again. A new hub on it answers every earlier request_id with exactly the bytes of its first
answer, converts anew, and the ledger's invariants hold.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, insert, inspect, select, update

from exchange.store import migrate
from exchange.store.schema import idempotency, postings
from merchant_sdk import MerchantClient, errors
from tests import harness
from tests.auditor import check_invariants


def _request_ids(n: int) -> list[str]:
    return [str(uuid.UUID(int=0x5EED0000 + i)) for i in range(n)]


def test_a_network_of_the_previous_schema_is_carried_over(tmp_path: Path, database_url: str | None) -> None:
    first = harness.RunningHub(tmp_path / "first", database_url)
    url = first.hub.engine.url.render_as_string(hide_password=False)
    rid = _request_ids(6)
    try:
        alpha, alpha_key = first.admit("alpha", cap_micros=10**12)
        beta, beta_key = first.admit("beta", cap_micros=10**12)
        for client in (alpha, beta):
            client.enroll_member("m1")
        beta.redeem_link_code("m1", alpha.create_link_code("m1").code)
        alpha.set_route("beta", "outbound")
        beta.set_route("alpha", "inbound")
        answers = {
            ("alpha", rid[0]): alpha.issue_points("m1", 5_000, request_id=rid[0]).SerializeToString(),
            ("alpha", rid[1]): alpha.convert("m1", "beta", 1_200, request_id=rid[1]).SerializeToString(),
        }
        quote = alpha.quote_conversion("m1", "beta", src_points=300)
        answers[("alpha", rid[2])] = alpha.convert(
            "m1", "beta", quote_id=quote.quote_id, request_id=rid[2]
        ).SerializeToString()
        with pytest.raises(errors.InsufficientPoints):
            alpha.convert("m1", "beta", 10**6, request_id=rid[3])
        alpha.close()
        beta.close()
    finally:
        first.stop()

    engine = create_engine(url)
    with engine.begin() as conn:  # what the previous hub stored: the replies' bytes, no results
        for (caller, request_id), reply in answers.items():
            conn.execute(
                update(idempotency)
                .where(idempotency.c.caller == caller, idempotency.c.request_id == request_id)
                .values(response=reply)
            )
        conn.execute(
            update(idempotency)
            .where(idempotency.c.result.is_not(None), idempotency.c.response.is_(None))
            .values(response=idempotency.c.result)  # requests this test never replays
        )
        conn.execute(update(idempotency).values(result=None))

    engine.dispose()
    command.downgrade(migrate.alembic_config(url), "0004")
    engine = create_engine(url)
    shape = inspect(engine)
    assert {fk["referred_table"] for fk in shape.get_foreign_keys("postings")} == {"operations", "accounts"}
    assert "result" not in {c["name"] for c in shape.get_columns("idempotency")}
    engine.dispose()

    migrate.upgrade(url)
    migrate.check(url)
    engine = create_engine(url)
    shape = inspect(engine)
    assert shape.get_foreign_keys("postings") == [] and shape.get_foreign_keys("conversions") == []
    engine.dispose()

    second = harness.RunningHub(tmp_path / "second", url)
    try:
        alpha = MerchantClient(second.target, "alpha", alpha_key)
        beta = MerchantClient(second.target, "beta", beta_key)
        assert alpha.issue_points("m1", 5_000, request_id=rid[0]).SerializeToString() == answers[("alpha", rid[0])]
        assert alpha.convert("m1", "beta", 1_200, request_id=rid[1]).SerializeToString() == answers[("alpha", rid[1])]
        replayed = alpha.convert("m1", "beta", quote_id=quote.quote_id, request_id=rid[2])
        assert replayed.SerializeToString() == answers[("alpha", rid[2])]
        with pytest.raises(errors.InsufficientPoints):  # a stored refusal replays as one
            alpha.convert("m1", "beta", 10**6, request_id=rid[3])
        fresh = alpha.convert("m1", "beta", 500, request_id=rid[4])  # the new hub writes on the old ledger
        again = alpha.convert("m1", "beta", 500, request_id=rid[4])
        assert fresh.SerializeToString() == again.SerializeToString()  # and replays its own results
        assert alpha.get_balance("m1").points == 5_000 - 1_200 - 300 - 500
        with second.hub.engine.connect() as conn:
            kept = conn.execute(
                select(idempotency.c.response, idempotency.c.result).where(idempotency.c.request_id == rid[4])
            ).one()
        assert kept.response is None and kept.result is not None
        alpha.close()
        beta.close()
        check_invariants(second.hub.engine)
    finally:
        second.stop()


def test_the_auditor_finds_a_leg_the_database_no_longer_refuses(tmp_path: Path, database_url: str | None) -> None:
    """Without the foreign keys (0006) the database accepts a posting naming nothing; the auditor does not."""
    running = harness.RunningHub(tmp_path, database_url)
    try:
        alpha, _key = running.admit("alpha")
        alpha.enroll_member("m1")
        movement = alpha.issue_points("m1", 10)
        alpha.close()
        check_invariants(running.hub.engine)
        seq = int(movement.operation_id.removeprefix("op_"))
        with running.hub.engine.begin() as conn:
            conn.execute(
                insert(postings).values(
                    operation_seq=seq,
                    asset="points:alpha",
                    debit_account_id=10**9,
                    credit_account_id=10**9 + 1,
                    amount=1,
                )
            )
        with pytest.raises(AssertionError, match="postings naming no operation or no account"):
            check_invariants(running.hub.engine)
    finally:
        running.stop()
