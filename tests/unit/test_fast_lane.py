"""Which models the fast lane serves (and why not the others), and how it is rendered: the
two filters run only on the reading route, the fast routes turn the route stage off."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from extproc.config import Config
from extproc.contract import Cluster, Meta
from extproc.core.fast_lane import describe, lanes, marks, record, record_socket
from extproc.render import render
from extproc.render.common import EXT_PROC_TYPE
from extproc.render.fast_lane import DECIDE_FILTER, LANE_FILTER, READ_FILTER, RESPONSES_FILTER
from extproc.shell.decision_log import lane_record


def config(**extra: Any) -> Config:
    data: dict[str, Any] = {
        "backends": [
            {"name": "v", "preset": "vllm", "url": "http://127.0.0.1:8000/v1",
             "models": [{"name": "plain"}, {"name": "shared"},
                        {"name": "slow", "attempt_timeout_s": 5}]},
            {"name": "w", "preset": "vllm", "url": "http://127.0.0.1:8001/v1",
             "models": [{"name": "shared"}, {"name": "renamed-here"}]},
            {"name": "cloud", "preset": "openai", "url": "https://api.example.com/v1",
             "api_key_env": "KEY", "models": [{"name": "gpt"}]},
            {"name": "prefixed", "preset": "openai", "url": "http://127.0.0.1:8002/api/v1",
             "models": [{"name": "deep"}]},
            {"name": "oa", "preset": "openai", "url": "http://127.0.0.1:8003/v1",
             "models": [{"name": "chat-only"}]},
        ],
        "models": [{"name": "nice", "aliases": ["nick", "renamed-here-too"],
                    "candidates": [{"backend": "w", "model": "renamed-here"}]},
                   {"name": "both", "aliases": ["either"],
                    "candidates": [{"backend": "v", "model": "shared"},
                                   {"backend": "w", "model": "shared"}]}],
    }
    return Config.model_validate({**data, **extra})


def test_which_models_and_why() -> None:
    fast, why = lanes(config())
    assert set(fast) == {"plain", "renamed-here", "nice", "nick", "renamed-here-too",
                         "chat-only"}
    assert (fast["nice"].served, fast["plain"].served) == ("renamed-here", "plain")
    assert fast["plain"].backend == "v" and fast["plain"].address == "127.0.0.1:8000"
    assert fast["plain"].paths == ("/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                   "/v1/messages", "/v1/responses")
    assert "/v1/messages" not in fast["chat-only"].paths  # (translated: the ext_proc path)
    assert "/v1/responses" in fast["chat-only"].paths  # (OpenAI's API speaks it)
    # OpenAI's API takes metadata only with store (the route stage drops it): not in the lane
    assert fast["plain"].metadata and not fast["chat-only"].metadata
    assert "2 candidates" in why["shared"]
    quoted = lanes(Config.model_validate({"backends": [{
        "name": "q", "url": "http://127.0.0.1:1/v1", "models": [{"name": 'a"b'}]}],
        "models": [{"name": "ok", "candidates": [{"backend": "q", "model": 'a"b'}]}]}))[1]
    assert "which JSON would escape" in quoted["ok"]
    assert "key of its own" in why["gpt"]
    assert "not at /v1" in why["deep"]
    assert "attempt timeout" in why["slow"]
    # An alias goes as its public model does, under its own name.
    assert (fast["nick"].model, fast["nick"].public, fast["nick"].served) == \
        ("nick", "nice", "renamed-here")
    assert why["either"] == "an alias of 'both': " + why["both"]
    assert "deep: ext_proc path (backend 'prefixed' is not at /v1)" in describe(config())


def test_off_when_the_config_says_so() -> None:
    for extra in ({"envoy": {"fast_lane": False}}, {"envoy": {"direct_cluster": False}},
                  {"ai_gateway": {"model_header": "x-ai-eg-model"}}):
        fast, why = lanes(config(**extra))
        assert not fast and len(set(why.values())) == 1


def test_the_record_is_the_route_stages_shape() -> None:
    alias = record("nice", "renamed-here", "w", "127.0.0.1:8001", "r2", "/v1/chat/completions",
                   "nick")
    assert (alias["model_requested"], alias["public_model"], alias["resolution"]) == \
        ("nick", "nice", "alias")
    assert record("nice", "renamed-here", "w", "", "r3", "/v1/chat/completions")[
        "resolution"] == "exact"
    rec = record("plain", "plain", "v", "127.0.0.1:8000", "rid", "/v1/embeddings")
    assert rec["plan"] == "fast" and rec["api"] == "embeddings" and rec["request_id"] == "rid"
    assert rec["candidates"] == [{"backend": "v", "model": "plain", "address": "127.0.0.1:8000"}]


def hcm(cfg: Config) -> dict[str, Any]:
    listener = render(cfg)["static_resources"]["listeners"][-1]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def test_rendered_filters_and_routes() -> None:
    h = hcm(config())
    names = [f["name"] for f in h["http_filters"]]
    assert names.index(READ_FILTER) < names.index(DECIDE_FILTER) < names.index("extproc.route")
    lua = next(f for f in h["http_filters"] if f["name"] == DECIDE_FILTER)[
        "typed_config"]["default_source_code"]["inline_string"]
    assert '["plain"] = {hosts = "127.0.0.1:8000"' in lua and '"deep"' not in lua
    assert '["plain"] = {hosts = "127.0.0.1:8000", backend = "v", metadata = true,' in lua
    assert '["chat-only"] = {hosts = "127.0.0.1:8003", backend = "oa", idle' in lua
    assert '["nice"] = {hosts = "127.0.0.1:8001", backend = "w", served = "renamed-here"' in lua
    assert '["nick"] = {hosts = "127.0.0.1:8001", backend = "w", served = "renamed-here", ' \
        'public = "nice"' in lua
    assert '"\\"response_format\\""' in lua and '"\\"tool_choice\\""' not in lua
    assert 'CHOICES = {["auto"] = true, ["none"] = true}' in lua  # read, not refused on sight
    routes = h["route_config"]["virtual_hosts"][0]["routes"]
    fast = [r for r in routes if r.get("name", "").startswith("fast_") and r["name"] != "fast_read"]
    assert fast and all(r["route"]["cluster"] == Cluster.DIRECT.value for r in fast)
    # The route stage is made only for a request without the lane's mark.
    stage = next(f for f in h["http_filters"] if f["name"] == "extproc.route")["typed_config"]
    only = stage["xds_matcher"]["matcher_list"]["matchers"][0]
    assert only["predicate"]["single_predicate"]["input"]["typed_config"]["path"] == [
        {"key": Meta.FAST.value}]
    assert only["predicate"]["single_predicate"]["custom_match"]["typed_config"]["invert"]
    assert only["on_match"]["action"]["typed_config"]["typed_config"]["typed_config"][
        "@type"] == EXT_PROC_TYPE
    assert all("authorization" in r["request_headers_to_remove"] for r in fast)
    assert all(r["match"]["dynamic_metadata"][0]["path"] == [{"key": Meta.FAST.value}]
               for r in fast)
    reading, default = routes[-2], routes[-1]
    assert reading["name"] == "fast_read" and "typed_per_filter_config" not in reading
    assert reading["match"]["headers"][0]["range_match"]["end"] == 256 * 1024 + 1
    # Every other request: Envoy never parses its body.
    off = default["typed_per_filter_config"]
    assert off[READ_FILTER]["disabled"] and off[DECIDE_FILTER]["disabled"]


def test_nothing_rendered_without_a_fast_model() -> None:
    h = hcm(config(envoy={"fast_lane": False}))
    assert READ_FILTER not in [f["name"] for f in h["http_filters"]]
    routes = h["route_config"]["virtual_hosts"][0]["routes"]
    assert not any(r.get("name", "").startswith("fast") for r in routes)
    assert "typed_per_filter_config" not in routes[-1]


def test_need_keys_send_requests_the_slow_way_where_incapable_ones_are_dropped() -> None:
    def lua(cfg: Config) -> str:
        return next(f for f in hcm(cfg)["http_filters"] if f["name"] == DECIDE_FILTER)[
            "typed_config"]["default_source_code"]["inline_string"]

    assert '"\\"tools\\""' not in lua(config())
    assert '"\\"tools\\""' in lua(config(capability_routing={"incapable": "drop"}))


def test_a_user_id_is_plain_metadata_unless_the_hints_read_it() -> None:
    def meta_key(**hints: Any) -> str:
        lua = next(f for f in hcm(config(hints=hints))["http_filters"]
                   if f["name"] == DECIDE_FILTER)["typed_config"]["default_source_code"]
        return next(line for line in lua["inline_string"].splitlines()
                    if line.startswith("local META_KEY"))

    assert meta_key().startswith('local META_KEY = "user_id"')
    assert meta_key(metadata_prefix="user").startswith("local META_KEY = nil")
    assert meta_key(propagate={"x-user": "user_id"}).startswith("local META_KEY = nil")


def test_a_quote_in_a_model_name_does_not_end_the_lua_string() -> None:
    cfg = Config.model_validate({"backends": [
        {"name": "v", "preset": "vllm", "url": "http://127.0.0.1:8000/v1",
         "models": [{"name": 'we"ird\\name'}]}]})
    lua = next(f for f in hcm(cfg)["http_filters"] if f["name"] == DECIDE_FILTER)[
        "typed_config"]["default_source_code"]["inline_string"]
    assert '["we\\"ird\\\\name"] = {hosts' in lua


def module_lines(cfg: Config, name: str = LANE_FILTER) -> list[list[str]]:
    f = next(f for f in hcm(cfg)["http_filters"] if f["name"] == name)["typed_config"]
    return [line.split("\t") for line in f["filter_config"]["value"].splitlines()]


def test_the_compiled_lane_is_rendered_from_the_same_rules() -> None:
    """One module in two places: the lane (the request filters' place) and the answers (the
    response Lua's); its rules the lists the Lua is rendered from; the access log no longer
    brings fast requests (the module sends their records)."""
    cfg = config(envoy={"fast_lane_compiled": True})
    h = hcm(cfg)
    names = [f["name"] for f in h["http_filters"]]
    assert READ_FILTER not in names and DECIDE_FILTER not in names
    assert names.index(LANE_FILTER) < names.index("extproc.route") < \
        names.index(RESPONSES_FILTER)
    roles = {f["name"]: f["typed_config"]["filter_name"] for f in h["http_filters"]
             if "dynamic_module_config" in f["typed_config"]}
    assert roles == {LANE_FILTER: "lane", RESPONSES_FILTER: "answers"}
    lines = module_lines(cfg)
    assert lines == module_lines(cfg, RESPONSES_FILTER)
    assert ["lane", "nick", "nice", "renamed-here", "w", "127.0.0.1:8001", "30000", "1",
            ",".join(lanes(cfg)[0]["nick"].paths)] in lines
    assert [m for k, m in (x for x in lines if len(x) == 2) if k == "mark"] == marks(cfg)
    assert ["path", "/v1/chat/completions", "ask"] in lines
    assert ["path", "/v1/messages", "typed_choice"] in lines
    assert ["socket", record_socket(cfg, 0)] in lines and ["meta", "user_id"] in lines
    routes = h["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[-1]["typed_per_filter_config"][LANE_FILTER]["disabled"]
    log = h["access_log"][0]["filter"]
    assert log["metadata_filter"]["matcher"]["path"] == [{"key": Meta.RECORD.value}]
    assert log["metadata_filter"]["match_if_key_not_found"] is False


def test_the_compiled_lane_tags_its_own_answers() -> None:
    """The compiled lane's routes carry no response header formatters and its cluster no
    filter stripping a backend's x-extproc-* headers (the module does both, cheaper); every
    other route tags as the virtual host does without it."""
    from extproc.contract import OWN_RESPONSE_HEADERS, RESP_ATTEMPTS, RESP_BACKEND, RESP_MODEL
    from extproc.render.routes import tags

    def strips(cluster: dict[str, Any]) -> bool:
        chain = cluster["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["http_filters"]
        return "extproc.strip_backend_tags" in [f["name"] for f in chain]

    for compiled in (False, True):
        cfg = config(envoy={"fast_lane_compiled": compiled})
        doc = render(cfg)
        host = hcm(cfg)["route_config"]["virtual_hosts"][0]
        clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
        fast = [r for r in host["routes"] if r.get("name", "").startswith("fast_")
                and r["name"] != "fast_read"]
        others = [r for r in host["routes"] if r not in fast]
        assert fast and others
        if not compiled:
            assert host["response_headers_to_add"] == tags()
            assert {r["route"]["cluster"] for r in fast} == {Cluster.DIRECT}
            assert Cluster.FAST not in clusters
            continue
        assert "response_headers_to_add" not in host
        assert all("response_headers_to_add" not in r for r in fast)
        assert all(r["response_headers_to_add"] == tags() for r in others)
        assert {r["route"]["cluster"] for r in fast} == {Cluster.FAST}
        assert not strips(clusters[Cluster.FAST]) and strips(clusters[Cluster.DIRECT])
        lines = module_lines(cfg)
        assert ["answer", RESP_BACKEND, RESP_MODEL, RESP_ATTEMPTS] in lines
        assert ["strip", *OWN_RESPONSE_HEADERS] in lines


def test_the_decision_log_takes_only_requests_with_a_record_or_the_lane_mark() -> None:
    """Envoy 1.40 takes a key not found as a match unless told: every request was logged."""
    log = hcm(config())["access_log"][0]["filter"]["or_filter"]["filters"]
    assert [f["metadata_filter"]["match_if_key_not_found"] for f in log] == [False, False]


def test_a_compiled_lane_record_is_completed_as_the_access_log_would() -> None:
    rt = SimpleNamespace(notes={})
    rec, retry_after = lane_record("\t".join([
        "L1", "rid", "/v1/chat/completions", "nick", "nice", "renamed-here", "w",
        "127.0.0.1:8001", "200", "1", "1796371019567515", "1.5", "1.6", "2.25", "10", "6",
        "1796371019568515", "1796371019569515", "team-a", "", "w", "renamed-here"]), rt)
    assert retry_after is None
    assert (rec["plan"], rec["outcome"], rec["status"], rec["model_requested"],
            rec["public_model"]) == ("fast", "ok", 200, "nick", "nice")
    assert rec["attempts"] == [{"n": 1, "backend": "w", "model": "renamed-here",
                                "address": "127.0.0.1:8001", "status": 200}]
    assert rec["timings_ms"] == {"to_first_backend_byte": 1.5, "to_first_client_byte": 1.6,
                                 "total": 2.25}
    assert rec["usage"] == {"input_tokens": 10, "output_tokens": 6, "ttft_ms": 1.0,
                            "tpot_ms": 0.2}
    assert rec["client"] == "team-a"
    dead, after = lane_record("\t".join([
        "L1", "r2", "/v1/embeddings", "plain", "plain", "plain", "v", "", "503", "1",
        "1796371019567515", "", "3.0", "3.5", "", "", "", "", "", "7", "", ""]), rt)
    assert (dead["outcome"], dead["model_requested"], after) == ("upstream_failed", "plain", "7")
    assert "to_first_backend_byte" not in dead["timings_ms"] and dead["usage"] == {}
    for junk in ("", "L1\tonly", "L2" + "\tx" * 21, "L1" + "\tx" * 21):
        with pytest.raises(ValueError):
            lane_record(junk, rt)
