"""Hints core: access rules, ignore-and-record mode, policies by tags, metadata limits."""

from __future__ import annotations

from extproc.config import parse_config
from extproc.core.routing import RoutingTable, route_request

from ..refusals import refused


def table(**hints: object) -> RoutingTable:
    return RoutingTable(parse_config({
        "backends": [
            {"name": "l", "url": "http://127.0.0.1:1/v1", "models": [{"name": "m", "tags": ["local"]}]},
            {"name": "c", "url": "http://127.0.0.1:2/v1", "models": [{"name": "m", "tags": ["cloud"]}]},
        ],
        "hints": {"policies": {"force-cloud": {"require_tags": ["cloud"]},
                               "cheap": {"prefer_tags": ["local"]}}, **hints},
    }))


def route(t: RoutingTable, meta: dict, headers: dict | None = None):
    return route_request(t, {"model": "m", "messages": [], "metadata": meta}, headers or {})


def test_ignore_mode_records_instead_of_refusing() -> None:
    t = table(on_denied="ignore", on_unknown="ignore",
              access=[{"clients": ["*"], "allow": ["intent"], "intents": ["cheap"]}])
    d = route(t, {"route_intent": "force-cloud", "route_backend": "c"})
    assert [c.backend for c in d.candidates] == ["l", "c"]  # no effect
    assert d.hints.applied == []
    assert any("may not use" in x for x in d.hints.ignored)
    d = route(t, {"route_intent": "nope"})
    assert d.hints.ignored[0].startswith("intent: no such intent")


def test_policy_by_tags_and_client_grants() -> None:
    t = table(access=[{"clients": ["ops"], "allow": ["intent", "order"]}])
    d = route(t, {"route_intent": "force-cloud"}, {"x-client-id": "ops"})
    assert [c.backend for c in d.candidates] == ["c"]
    assert d.hints.policy == "force-cloud"
    assert refused(route, t, {"route_intent": "force-cloud"}, {"x-client-id": "intruder"})[
        "status"] == 403
    d = route(t, {"route_order": "c,l"}, {"x-client-id": "ops"})
    assert [c.backend for c in d.candidates] == ["c", "l"]


def test_headers_can_be_disabled() -> None:
    t = table(headers_enabled=False, access=[{"clients": ["*"], "allow": ["intent"]}])
    d = route_request(t, {"model": "m", "messages": []}, {"x-route-intent": "force-cloud"})
    assert d.hints.values == {}


def test_routing_keys_collected_for_removal() -> None:
    d = route(table(on_unknown="ignore"), {"route_anything": "x", "keep": "y"})
    assert d.hints.routing_keys == ["route_anything"]


def test_an_unknown_key_under_the_prefix_follows_on_unknown() -> None:
    err = refused(route, table(), {"route_intnet": "force-cloud"})  # a typo is not ignored
    assert (err["status"], err["code"], err["param"]) == (400, "unknown_hint",
                                                          "metadata.route_intnet")
    assert "route_intent" in err["message"]
    d = route(table(on_unknown="ignore"), {"route_intnet": "force-cloud", "other": "kept"})
    assert d.hints.ignored == ["metadata.route_intnet: not a routing key"]
    # A kind the config does not enable is no routing key either.
    t = table(metadata_keys={"intent": "intent"})
    assert refused(route, t, {"route_backend": "c"})["param"] == "metadata.route_backend"
    assert route(t, {"route_intent": "cheap"}).hints.policy == "cheap"


def test_metadata_limit_message_names_the_key() -> None:
    err = refused(route, table(), {"x": "v" * 600})
    assert (err["status"], err["code"], err["param"]) == (400, "invalid_metadata", "metadata.x")
    assert "600 characters; at most 512" in err["message"]
