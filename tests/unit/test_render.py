"""The rendered Envoy config: up to date in the repo, the security and limits it must carry,
and the contract's names where Envoy reads them (the real binary checks it in tests/e2e)."""

from __future__ import annotations

from pathlib import Path

import yaml

from extproc.config import load_config
from extproc.contract import ATTEMPT_ATTRIBUTES, SERVICE_CLUSTER, Cluster, Meta, attribute
from extproc.render import render, render_yaml

ROOT = Path(__file__).resolve().parents[2]


def test_repo_envoy_config_is_up_to_date() -> None:
    cfg = load_config(ROOT / "config" / "demo.yaml")
    assert (ROOT / "envoy" / "demo.yaml").read_text() == render_yaml(cfg, "demo.yaml"), (
        "envoy/demo.yaml is stale: run `make envoy-config`")


def test_security_and_limits_in_rendered_config() -> None:
    cfg = load_config(ROOT / "config" / "demo.yaml")
    doc = render(cfg)
    listener = doc["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    rc = hcm["route_config"]
    assert "x-extproc-cluster" in rc["internal_only_headers"]
    route = rc["virtual_hosts"][0]["routes"][-1]  # (the ordinary one: every other request)
    assert route["match"] == {"prefix": "/"}
    assert route["route"]["cluster_header"] == "x-extproc-cluster"
    assert route["request_body_buffer_limit"] >= 8 * 1024 * 1024
    assert listener["per_connection_buffer_limit_bytes"] >= 8 * 1024 * 1024
    route_filter = next(f for f in hcm["http_filters"] if f["name"] == "extproc.route")[
        "typed_config"]
    if "xds_matcher" in route_filter:  # (made only for requests the fast lane did not take)
        route_filter = route_filter["xds_matcher"]["matcher_list"]["matchers"][0]["on_match"][
            "action"]["typed_config"]["typed_config"]["typed_config"]
    assert route_filter["failure_mode_allow"] is False
    assert route_filter["processing_mode"]["request_body_mode"] == "BUFFERED"
    pool = doc["static_resources"]["clusters"][1]
    addrs = [e["endpoint"]["address"]["socket_address"]["port_value"]
             for e in pool["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert addrs == [18001, 18002, 18006, 18003, 18004, 18005]
    assert doc["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    yaml.safe_load(render_yaml(cfg))  # round-trips


def test_the_contracts_names_are_what_envoy_is_told() -> None:
    """The planner's metadata keys and cluster names are the renderer's: one source."""
    doc = render(load_config(ROOT / "config" / "demo.yaml"))
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    assert {c.value for c in Cluster} - {Cluster.FAST} <= set(clusters)  # (FAST: compiled lane)
    lb = clusters[Cluster.POOL]["load_balancing_policy"]["policies"][0]["typed_extension_config"]
    assert lb["typed_config"]["override_host_sources"][0]["metadata"]["path"] == \
        [{"key": Meta.HOSTS.value}]
    stage = clusters[Cluster.POOL]["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"][0]
    assert stage["typed_config"]["request_attributes"] == list(ATTEMPT_ATTRIBUTES)
    assert attribute(Meta.CANDIDATES) in ATTEMPT_ATTRIBUTES


def test_the_response_side_lua_is_there_only_when_something_needs_it() -> None:
    from extproc.config import parse_config
    from extproc.render.filters import http_filters

    def lua(**envoy: object) -> str | None:
        cfg = parse_config({"backends": [{"name": "b", "url": "http://127.0.0.1:1/v1",
                                          "models": [{"name": "m"}]}], "envoy": envoy})
        found = [f for f in http_filters(cfg) if f["name"] == "extproc.responses"]
        return found[0]["typed_config"]["default_source_code"]["inline_string"] if found \
            else None

    both = lua()
    assert both is not None and "local HOLD = true" in both and "local USAGE = true" in both
    assert f'"{Meta.USAGE_OUT}"' in both and f'"{Meta.FIRST_TOKEN_US}"' in both
    assert "local USAGE = false" in (lua(token_usage=False) or "")
    assert "local HOLD = false" in (lua(whole_responses=False) or "")
    assert lua(token_usage=False, whole_responses=False) is None


def test_the_service_is_reached_by_its_unix_sockets_when_it_has_them() -> None:
    demo = load_config(ROOT / "config" / "demo.yaml")

    def addresses(**service: object) -> list[dict]:
        cfg = demo.model_copy(update={"service": demo.service.model_copy(update={
            "workers": 2, **service})})
        svc = next(c for c in render(cfg)["static_resources"]["clusters"]
                   if c["name"] == SERVICE_CLUSTER)
        return [e["endpoint"]["address"] for e in svc["load_assignment"]["endpoints"][0][
            "lb_endpoints"]]

    assert addresses(unix_socket="/run/llm/svc.sock") == [
        {"pipe": {"path": "/run/llm/svc.sock"}}, {"pipe": {"path": "/run/llm/svc.sock.1"}}]
    assert [a["socket_address"]["port_value"] for a in addresses()] == \
        [demo.service.port, demo.service.port + 1]
