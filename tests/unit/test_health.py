"""Backend health without I/O: probes, passive ejection from decision records, Retry-After,
and what they do to a request's candidate order; tiers spreading load; attempt limits."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from extproc.config import HealthSettings, parse_config
from extproc.core.health import Health, observe, retry_after_seconds
from extproc.core.routing import RoutingTable, attempt_limits, route_request

S = HealthSettings(unhealthy_threshold=2, healthy_threshold=2, eject_after_failures=3,
                   ejection_s=10, max_ejection_s=25, max_retry_after_s=60)


def test_probes_need_their_thresholds_both_ways() -> None:
    h = Health(S, ["a"])
    assert h.probed("a", False, "ConnectError", 0, 100) is None
    assert h.available("a", 0)
    assert h.probed("a", False, "ConnectError", 1, 101) == "unhealthy"
    assert not h.available("a", 1) and h.down == 1
    st = h.state("a", 1)
    assert (st["state"], st["since"]) == ("unhealthy", 101)
    assert st["reason"] == "health probe failed: ConnectError"
    assert h.probed("a", True, "HTTP 200", 2, 102) is None and not h.available("a", 2)
    assert h.probed("a", True, "HTTP 200", 3, 103) == "healthy"
    assert h.available("a", 3) and h.down == 0


def test_failed_attempts_eject_for_a_growing_interval() -> None:
    h = Health(S, ["a"])
    for t in (0, 1):
        assert h.attempt("a", False, "HTTP 503", t, t) is None
    assert h.attempt("a", False, "HTTP 503", 2, 2) == "ejected"
    assert not h.available("a", 11.9) and h.available("a", 12.1) and h.down == 0
    for t in (13, 14, 15):  # again: twice as long
        h.attempt("a", False, "reset", t, t)
    assert not h.available("a", 34.9) and h.available("a", 35.1)
    for t in (36, 37, 38):  # capped at max_ejection_s
        h.attempt("a", False, "reset", t, t)
    assert not h.available("a", 62.9) and h.available("a", 63.1)
    h.attempt("a", True, "HTTP 200", 64, 64)  # a success in between resets the count
    h.attempt("a", False, "reset", 65, 65)
    h.attempt("a", False, "reset", 66, 66)
    h.attempt("a", True, "HTTP 200", 67, 67)
    assert h.attempt("a", False, "reset", 68, 68) is None and h.available("a", 68)


def test_retry_after_cools_down_capped_and_never_shortens() -> None:
    h = Health(S, ["a"])
    assert h.retry_after("a", 30, 0, 0) == "cooling"
    assert h.state("a", 10)["for_s"] == 20.0
    assert h.retry_after("a", 5, 1, 1) is None  # an earlier end does not shorten it
    assert not h.available("a", 29) and h.available("a", 31)
    h.retry_after("a", 3600, 40, 40)
    assert not h.available("a", 99.9) and h.available("a", 100.1)  # max_retry_after_s


def test_retry_after_header_forms() -> None:
    now = 1_800_000_000.0
    assert retry_after_seconds("30", now) == 30
    date = format_datetime(datetime.fromtimestamp(now + 90, UTC), usegmt=True)
    assert retry_after_seconds(date, now) == pytest.approx(90, abs=1)
    assert retry_after_seconds("soon", now) is None and retry_after_seconds(None, now) is None


def record(attempts: list[str], status: int, retries: list[int] = (), outcome: str = "ok"
           ) -> dict:
    return {"outcome": outcome, "status": status,
            "attempts": [{"n": i + 1, "backend": b} for i, b in enumerate(attempts)],
            "capability_retries": [{"attempt": n} for n in retries]}


def test_decision_records_feed_passive_detection() -> None:
    h = Health(S, ["a", "b"])
    # a failed twice (retried), b answered: two failures on a, b fine.
    observe(h, record(["a", "b"], 200), None, 0, 0)
    observe(h, record(["a", "b"], 200), None, 1, 1)
    # A capability retry is not the backend being down.
    observe(h, record(["a", "b"], 200, retries=[1]), None, 2, 2)
    assert h.available("a", 2)
    moved = observe(h, record(["a", "b"], 200), None, 3, 3)
    assert moved == [("a", "ejected")] and not h.available("a", 3) and h.available("b", 3)
    # The last attempt failing: a 5xx or an upstream failure counts, a 4xx does not.
    for t in (4, 5, 6):
        observe(h, record(["b"], 400), None, t, t)
    assert h.available("b", 6)
    for t in (7, 8, 9):
        observe(h, record(["b"], 503, outcome="upstream_failed"), None, t, t)
    assert not h.available("b", 9)
    # A final 429 cools the backend per its Retry-After; rejected or abandoned: nothing.
    h2 = Health(S, ["a"])
    assert observe(h2, record(["a"], 429), "20", 0, 0) == [("a", "cooling")]
    assert observe(h2, {"outcome": "rejected", "status": 400}, None, 0, 0) == []
    assert observe(h2, record(["a"], 0), None, 0, 0) == []


CFG = parse_config({
    "backends": [{"name": n, "url": f"http://127.0.0.1:{8000 + i}/v1", "models": [{"name": "m"}]}
                 for i, n in enumerate(("a", "b", "c", "d"))],
    "models": [
        {"name": "tiered", "candidates": [
            {"backend": "a", "model": "m", "tier": 0, "weight": 3},
            {"backend": "b", "model": "m", "tier": 0},
            {"backend": "c", "model": "m", "tier": 1}]},
        {"name": "strict", "candidates": [{"backend": "c", "model": "m"},
                                          {"backend": "d", "model": "m"}]}],
    "expose_backend_models": False,
})
TABLE = RoutingTable(CFG)


def order(model: str, health: Health | None = None, draw=random.random) -> list[str]:
    d = route_request(TABLE, {"model": model, "messages": []}, {}, health, 0.0, draw)
    return [t.backend for t in d.candidates]


def test_tiers_spread_by_weight_and_keep_their_order() -> None:
    rng = random.Random(7)
    firsts = [order("tiered", draw=rng.random) for _ in range(4000)]
    assert all(o[2] == "c" for o in firsts)  # the lower tier first, always
    share = sum(o[0] == "a" for o in firsts) / len(firsts)
    assert 0.71 < share < 0.79  # weight 3 of 4
    assert all(order("strict") == ["c", "d"] for _ in range(20))


def test_down_candidates_are_skipped_while_another_is_up() -> None:
    h = Health(S, ["a", "b", "c", "d"])
    for t in (0, 1):
        h.probed("c", False, "ConnectError", t, t)
    d = route_request(TABLE, {"model": "strict", "messages": []}, {}, h, 2.0)
    assert [t.backend for t in d.candidates] == ["d"]
    assert d.unavailable == [{"backend": "c", "state": "unhealthy", "since": 1,
                              "reason": "health probe failed: ConnectError", "model": "m",
                              "skipped": True}]
    for t in (0, 1):
        h.probed("d", False, "ConnectError", t, t)
    d = route_request(TABLE, {"model": "strict", "messages": []}, {}, h, 2.0)
    assert [t.backend for t in d.candidates] == ["c", "d"]  # all down: all tried
    assert [u["skipped"] for u in d.unavailable] == [False, False]


def test_attempt_limits_are_the_longest_of_the_candidates() -> None:
    cfg = parse_config({
        "backends": [{"name": "fast", "url": "http://127.0.0.1:1/v1", "stream_idle_s": 5,
                      "models": [{"name": "m"}, {"name": "slow-m", "attempt_timeout_s": 500}]},
                     {"name": "other", "url": "http://127.0.0.1:2/v1", "models": [{"name": "m"}]}],
        "models": [{"name": "p", "candidates": [{"backend": "fast", "model": "slow-m"},
                                                {"backend": "other", "model": "m"}]},
                   {"name": "q", "candidates": [{"backend": "fast", "model": "m"}]}],
        "envoy": {"route_timeout_s": 900}})
    t = RoutingTable(cfg)
    for model, limits in (("p", (500, 30.0)), ("q", (300.0, 5))):
        d = route_request(t, {"model": model, "messages": []})
        assert attempt_limits(t, d) == limits


def test_attempt_limits_must_be_below_the_route_timeout() -> None:
    from extproc.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        parse_config({"backends": [{"name": "a", "url": "http://127.0.0.1:1/v1",
                                    "attempt_timeout_s": 700, "models": [{"name": "m"}]}]})
    assert exc.value.problems == [
        "backends[0].attempt_timeout_s: 700.0 is not below envoy.route_timeout_s (600.0): "
        "Envoy would ignore it"]
