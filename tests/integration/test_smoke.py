from __future__ import annotations

from tests.harness import RunningHub


def test_issue_and_redeem(hub: RunningHub) -> None:
    client, _key = hub.admit("coffee")
    client.enroll_member("alice")
    assert client.issue_points("alice", 500).balance_points == 500
    assert client.redeem_points("alice", 200).balance_points == 300
    assert client.get_balance("alice").points == 300
