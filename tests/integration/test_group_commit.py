"""Group commit through a real hub (exchange/store/writer.py), on SQLite and on PostgreSQL.

Concurrent requests share commits yet keep their own outcomes: a refused item among accepted
ones changes nothing of its own and nothing of theirs; the same request sent several times at once
lands in one batch and posts once, with byte-identical answers, and again later replays; a
ConvertBatch is served through the same writer. The `hub` fixture's auditor checks every
invariant afterwards (balances from postings, each acknowledged operation stored once).
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from merchant_sdk import MerchantClient, errors
from merchant_sdk._pb.pointsx.v1 import ledger_pb2
from tests.harness import RunningHub
from tests.integration.test_clearing import BIG_CAP, network_on

MEMBERS = 40


def test_concurrent_writes_share_commits_and_keep_their_own_outcomes(hub: RunningHub) -> None:
    brew, _key = hub.admit("brew", cap_micros=BIG_CAP)
    refs = [f"m{i:02d}" for i in range(MEMBERS)]
    for ref in refs:
        brew.enroll_member(ref)
    before = hub.hub.writer.stats.batches, hub.hub.writer.stats.items

    def earn_or_overspend(i: int) -> ledger_pb2.PointsMovement | errors.PointsxError:
        try:
            if i % 4 == 3:  # every fourth asks to spend what its member never had
                return brew.redeem_points(refs[i], 1_000_000)
            return brew.issue_points(refs[i], 100 + i)
        except errors.PointsxError as refusal:
            return refusal

    with ThreadPoolExecutor(MEMBERS) as pool:
        outcomes = list(pool.map(earn_or_overspend, range(MEMBERS)))
    for i, result in enumerate(outcomes):
        if i % 4 == 3:
            assert isinstance(result, errors.InsufficientPoints), result
            assert brew.get_balance(refs[i]).points == 0
        else:
            assert isinstance(result, ledger_pb2.PointsMovement) and result.balance_points == 100 + i
            assert brew.get_balance(refs[i]).points == 100 + i
    batches = hub.hub.writer.stats.batches - before[0]
    items = hub.hub.writer.stats.items - before[1]
    assert items >= 2 * MEMBERS, "each write (its nonce in its commit) and each read's nonce went through the writer"
    assert batches < items, f"{items} writes in {batches} commits: they were batched"
    brew.close()


def test_the_same_request_sent_at_once_posts_once_with_identical_answers(hub: RunningHub) -> None:
    brew, _key = hub.admit("brew", cap_micros=BIG_CAP)
    brew.enroll_member("alice")
    request_id = str(uuid.uuid4())
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: brew.issue_points("alice", 250, request_id=request_id), range(5)))
    assert len({a.SerializeToString() for a in answers}) == 1, "one stored answer, byte for byte"
    assert brew.get_balance("alice").points == 250
    again = brew.issue_points("alice", 250, request_id=request_id)  # a later batch: replayed, not posted
    assert again == answers[0] and brew.get_balance("alice").points == 250
    with pytest.raises(errors.RequestIdReused):
        brew.issue_points("alice", 251, request_id=request_id)
    refused_id = str(uuid.uuid4())
    with ThreadPoolExecutor(5) as pool:
        refusals = list(pool.map(lambda _: _refusal(brew, "alice", 10_000, refused_id), range(5)))
    assert {(r.reason, r.message) for r in refusals} == {(refusals[0].reason, refusals[0].message)}
    assert isinstance(refusals[0], errors.InsufficientPoints) and brew.get_balance("alice").points == 250
    brew.close()


def _refusal(client: MerchantClient, ref: str, points: int, request_id: str) -> errors.PointsxError:
    try:
        client.redeem_points(ref, points, request_id=request_id)
    except errors.PointsxError as refusal:
        return refusal
    raise AssertionError("the overdraft was accepted")


def test_convert_batch_goes_through_the_writer_item_by_item(tmp_path: Path, database_url: str | None) -> None:
    with network_on(tmp_path, database_url) as net:
        net.merchant("alpha", 10_000, issued=10_000)
        net.merchant("beta", 50_000)
        net.link("alpha", "beta")
        net.route("alpha", "beta")
        alpha = net.clients["alpha"]
        sizes = [100] * 60 + [1_000_000] + [100] * 39  # item 60 asks for more than alpha's member holds
        items = [alpha.conversion_request(net.ref("alpha"), "beta", points) for points in sizes]
        for item in items:
            item.request_id = str(uuid.uuid4())
        first = alpha.convert_batch(items)
        assert [r.index for r in first.results] == list(range(100))
        refused = [r.index for r in first.results if r.WhichOneof("outcome") == "error"]
        assert refused == [60] and "INSUFFICIENT_POINTS" in str(first.results[60].error)
        assert alpha.get_balance(net.ref("alpha")).points == 10_000 - 99 * 100
        replayed = alpha.convert_batch(items)  # every item again, as after a lost answer
        assert replayed == first
        assert alpha.get_balance(net.ref("alpha")).points == 10_000 - 99 * 100
        ids = {r.conversion.conversion_id for r in first.results if r.WhichOneof("outcome") == "conversion"}
        assert len(ids) == 99
        unary = alpha.convert(net.ref("alpha"), "beta", 100, request_id=items[0].request_id)
        assert unary == first.results[0].conversion, "a batch item and its unary twin are one request"
