"""pgqr.plan_next's rules, row by row: each case is an instance's bookkeeping, one result and the database's time
`at`, and what the plan must say. No clock is waited on: `at` is an argument."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import Database

AT = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def t(seconds: float) -> datetime:
    """AT plus `seconds`."""
    return AT + timedelta(seconds=seconds)


def plan(db: Database, state: dict[str, Any], result: dict[str, Any], at: datetime = AT) -> dict[str, Any]:
    """plan_next for the instance 'shop' with its bookkeeping set to `state` (other columns as after a fresh
    start; what schedules the next call lives in pgqr.schedule, the rest in pgqr.instance_state), one result (a
    poll unless it says otherwise) and the database's time `at`."""
    scheduled = {r["attname"] for r in db.query("SELECT attname FROM pg_attribute "
                                                "WHERE attrelid = 'pgqr.schedule'::regclass AND attnum > 0 "
                                                "AND NOT attisdropped")}
    for table, columns in (("schedule", [c for c in state if c in scheduled]),
                           ("instance_state", [c for c in state if c not in scheduled])):
        if columns:
            sets = ", ".join(f"{column} = %s" for column in columns)
            db.query(f"UPDATE pgqr.{table} SET {sets} "
                     "WHERE key = (SELECT key FROM pgqr.instance_state WHERE name = 'shop')",
                     tuple(state[c] for c in columns))
    [row] = db.query(
        "SELECT p.* FROM pgqr.instance_state s JOIN pgqr.schedule q USING (key), "
        "LATERAL pgqr.plan_next(s, q, jsonb_populate_record(NULL::pgqr.result, %s::jsonb), %s) p "
        "WHERE s.name = 'shop'",
        (json.dumps({"key": "k", "source": "poll", **result}), at))
    return row


@pytest.fixture
def shop(quiet: Database) -> Database:
    quiet.query("INSERT INTO public.evolution_instances (instance_name, instance_status) VALUES ('shop', 'connecting')")
    # a claim made 1 s before AT (the poll's start, by the database's clock)
    quiet.query("UPDATE pgqr.schedule SET claimed_at = %s, last_poll_at = NULL, recent_polls = '{}'",
                (t(-1),))
    return quiet


NEW_IMAGE = {"outcome": "qr", "md5": "new", "qr": "data:image/png;base64,NEW", "latency_ms": 200}


def test_a_fast_new_image_was_born_after_the_last_poll_that_did_not_show_it(shop: Database) -> None:
    # the last poll (started 4 s before this one's claim) still showed the old image, which was born 50 s ago
    p = plan(shop, {"qr_md5": "old", "last_poll_at": t(-5), "qr_born_after": t(-50), "qr_seen_at": t(-48)},
             NEW_IMAGE)
    assert p["changed"] is True and p["stale"] is False
    # seen at the claim plus the call's latency (the database's clock), born no earlier than the last poll
    assert p["qr_seen_at"] == t(-0.8)
    assert p["qr_born_after"] == t(-5)
    assert p["qr_expires_at"] == t(40)
    assert p["due_at"] == t(40.5)  # just after the earliest possible expiry (rotation margin 0.5 s)


def test_a_new_image_is_never_born_before_the_one_it_replaced_expired(shop: Database) -> None:
    # the last poll was 30 s ago, but the old image (born after -50 s) lived until at least -5 s
    p = plan(shop, {"qr_md5": "old", "last_poll_at": t(-30), "qr_born_after": t(-50), "qr_seen_at": t(-49)},
             NEW_IMAGE)
    assert p["qr_born_after"] == t(-5) and p["qr_expires_at"] == t(40)


def test_a_slow_new_image_went_through_the_close_branch_and_was_born_during_the_call(shop: Database) -> None:
    p = plan(shop, {"qr_md5": "old", "last_poll_at": t(-20), "qr_born_after": t(-60)},
             {**NEW_IMAGE, "latency_ms": 2000})
    assert p["changed"] is True
    assert p["qr_born_after"] == t(-1)  # the claim: the call's start
    assert p["qr_expires_at"] == t(44)


def test_the_same_image_again_narrows_the_estimate_and_retries_in_half_the_window(shop: Database) -> None:
    p = plan(shop, {"qr_md5": "same", "qr_born_after": t(-30), "qr_seen_at": t(-30), "qr_expires_at": t(15)},
             {"outcome": "qr", "md5": "same", "latency_ms": 100}, at=t(10))
    assert p["changed"] is False and p["stale"] is False
    # still current when seen (-0.9 s): born no earlier than 45 s before that
    assert p["qr_born_after"] == t(-30) and p["qr_expires_at"] == t(15)
    # 5 s left of its life: half of that, within [1 s, 5 s]
    assert p["due_at"] == t(12.5)


def test_the_same_image_seen_late_moves_the_birth_estimate_forward(shop: Database) -> None:
    p = plan(shop, {"qr_md5": "same", "qr_born_after": t(-60), "qr_seen_at": t(-40), "qr_expires_at": t(-15)},
             {"outcome": "qr", "md5": "same", "latency_ms": 100}, at=t(-0.5))
    assert p["qr_born_after"] == t(-0.9) - timedelta(seconds=45)


def test_a_slow_reply_with_the_same_image_backs_off_at_the_close_cadence(shop: Database) -> None:
    p = plan(shop, {"qr_md5": "same", "qr_born_after": t(-10), "qr_seen_at": t(-10), "last_outcome": "qr",
                    "repeats": 1},
             {"outcome": "qr", "md5": "same", "latency_ms": 2000})
    assert p["repeats"] == 2
    assert p["due_at"] == t(80)  # close_poll_seconds 20 doubled twice


def test_an_image_overdue_for_rotation_backs_off_instead_of_retrying_every_second(shop: Database) -> None:
    p = plan(shop, {"qr_md5": "same", "qr_born_after": t(-200), "qr_seen_at": t(-200), "last_outcome": "qr",
                    "repeats": 2},
             {"outcome": "qr", "md5": "same", "latency_ms": 100})
    assert p["due_at"] == t(5 * 2 ** 3)


def test_a_webhook_qr_moves_the_next_poll_out_to_the_safety_cadence(shop: Database) -> None:
    p = plan(shop, {"qr_md5": "old", "due_at": t(3)},
             {"source": "webhook", "outcome": "qr", "md5": "hooked", "qr": "data:image/png;base64,H"})
    assert p["changed"] is True
    assert p["qr_seen_at"] == AT and p["qr_born_after"] == AT and p["qr_expires_at"] == t(45)
    assert p["due_at"] == t(60)


def test_an_image_the_instance_already_had_is_stale_by_poll_and_by_webhook(shop: Database) -> None:
    state = {"qr_md5": "current", "qr_history": ["older", "old"], "qr_born_after": t(-10), "qr_seen_at": t(-10),
             "qr_expires_at": t(35), "due_at": t(36)}
    by_poll = plan(shop, state, {"outcome": "qr", "md5": "old", "qr": "data:image/png;base64,OLD", "latency_ms": 50})
    assert (by_poll["changed"], by_poll["stale"]) == (False, True)
    assert by_poll["qr_expires_at"] == t(35)  # the estimate stands
    assert by_poll["due_at"] == t(35.5)       # nothing newer can exist before the current image expires
    by_webhook = plan(shop, state, {"source": "webhook", "outcome": "qr", "md5": "older",
                                    "qr": "data:image/png;base64,OLDER"})
    assert (by_webhook["changed"], by_webhook["stale"], by_webhook["due_at"]) == (False, True, t(36))
    # positive control: an image it never had is new
    fresh = plan(shop, state, {"source": "webhook", "outcome": "qr", "md5": "newest", "qr": "data:image/png;base64,N"})
    assert (fresh["changed"], fresh["stale"]) == (True, False)


def test_a_poll_image_older_than_what_was_stored_during_the_call_is_stale(shop: Database) -> None:
    # a webhook stored an image 0.5 s after this poll's claim; the poll brings another one, made before
    p = plan(shop, {"qr_md5": "hooked", "qr_seen_at": t(-0.5)}, {**NEW_IMAGE, "md5": "polled"})
    assert (p["changed"], p["stale"]) == (False, True)
    # positive control: stored before the claim, the same reply is news
    p = plan(shop, {"qr_md5": "hooked", "qr_seen_at": t(-1.5)}, {**NEW_IMAGE, "md5": "polled"})
    assert (p["changed"], p["stale"]) == (True, False)


def test_no_poll_is_due_before_the_rate_cap_allows(shop: Database) -> None:
    # twelve claims in the last minute, the oldest 50 s ago: nothing before 10 s from now
    polls = [t(-50 + 4 * i) for i in range(12)]
    p = plan(shop, {"recent_polls": polls}, {"outcome": "no_qr", "latency_ms": 50})
    assert p["due_at"] == t(10)
    # positive control: eleven claims leave the plan alone (no_qr retries in no_qr_retry_seconds, 3 s)
    p = plan(shop, {"recent_polls": polls[1:], "last_outcome": None}, {"outcome": "no_qr", "latency_ms": 50})
    assert p["due_at"] == t(3)


def test_a_failure_backs_off_by_its_class_and_a_connect_ends_the_schedule(shop: Database) -> None:
    p = plan(shop, {"consecutive_failures": 0}, {"outcome": "failed", "error_class": "unauthorized"})
    assert p["due_at"] >= t(900)
    p = plan(shop, {}, {"outcome": "connected"})
    assert p["due_at"] is None


def test_a_close_webhook_brings_the_next_poll_forward_to_the_close_cadence(shop: Database) -> None:
    p = plan(shop, {"due_at": t(300), "last_outcome": None}, {"source": "webhook", "outcome": "event",
                                                              "evolution_state": "close"})
    assert p["due_at"] == t(20)
