"""Discovery without sockets: each server's answers read in its own shapes, the catalog's
memory of what went away, the routing table rebuilt from config + catalog (the config wins),
context-aware order, which server a URL is, and the poller's failures (nothing changes, one
log line, backoff) through httpx's mock transport."""

from __future__ import annotations

import logging

import httpx
import orjson
import pytest

from extproc.config import parse_config
from extproc.core.capabilities import Caps
from extproc.core.discovery import (
    NOTHING,
    Catalog,
    Found,
    merge,
    read_llamacpp_props,
    read_model_list,
    read_ollama_show,
    read_ollama_tags,
    server_kind,
)
from extproc.core.routing import RoutingTable, estimate_tokens, route_request
from extproc.effects.discovery import Discoverer
from extproc.runtime import Runtime

from ..refusals import refused


def j(value: object) -> bytes:
    return orjson.dumps(value)


def test_openai_style_lists_in_each_servers_shape() -> None:
    vllm = read_model_list(j({"object": "list", "data": [
        {"id": "Qwen/Qwen3-8B", "object": "model", "owned_by": "vllm", "root": "Qwen/Qwen3-8B",
         "parent": None, "max_model_len": 32768},
        {"id": "sql-lora", "object": "model", "parent": "Qwen/Qwen3-8B",
         "max_model_len": 32768}]}))
    assert vllm == [Found("Qwen/Qwen3-8B", None, 32768), Found("sql-lora", None, 32768)]
    llama = read_model_list(j({"object": "list", "data": [
        {"id": "qwen.gguf", "meta": {"n_ctx_train": 40960, "n_params": 7}}]}))
    assert llama == [Found("qwen.gguf", None, 40960)]
    router = read_model_list(j({"data": [
        {"id": "a/b", "context_length": 128000,
         "supported_parameters": ["tools", "tool_choice", "response_format"],
         "architecture": {"input_modalities": ["text", "image"]}}]}))
    caps = router[0].caps
    assert caps is not None and caps.present == {"tools", "json", "vision"}
    assert caps.lacks("audio") and caps.lacks("reasoning") and not caps.lacks("json")
    for garbage in (b"<html>", j({"data": "x"}), j([1]), b"x" * (5 << 20)):
        with pytest.raises(ValueError):
            read_model_list(garbage)


def test_ollama_and_llamacpp_model_cards() -> None:
    assert read_ollama_tags(j({"models": [{"name": "llava:7b", "digest": "d1"}, {"x": 1}]})) == \
        [("llava:7b", "d1")]
    caps, ctx = read_ollama_show(j({"capabilities": ["completion", "vision", "thinking"],
                                    "model_info": {"llama.context_length": 131072}}))
    assert caps is not None and caps.present == {"vision", "reasoning"} and ctx == 131072
    assert caps.lacks("tools") and not caps.lacks("json")  # Ollama does not say about JSON
    blind, _ = read_ollama_show(j({"capabilities": ["completion"]}))
    assert blind is not None and blind.lacks("vision")
    caps, ctx = read_llamacpp_props(j({"default_generation_settings": {"n_ctx": 8192},
                                       "modalities": {"vision": True, "audio": False}}))
    assert caps is not None and caps.present == {"vision"} and caps.lacks("audio")
    assert not caps.lacks("tools") and ctx == 8192  # no chat_template_caps: tools unknown


def test_what_a_backend_stops_listing_is_gone_until_listed_again() -> None:
    c = merge(NOTHING, "b", [Found("x"), Found("y")])
    c = merge(c, "b", [Found("x")])
    assert c.gone == {("b", "y")}
    c = merge(c, "b", [Found("x"), Found("y")])
    assert c.gone == frozenset()


CFG = parse_config({
    "backends": [
        {"name": "v", "preset": "vllm", "url": "http://127.0.0.1:8001/v1",
         "models": [{"name": "base", "capabilities": ["tools"]}]},
        {"name": "o", "preset": "ollama", "url": "http://127.0.0.1:8002/v1",
         "discovery": {"prefix": "ollama/", "exclude": ["*embed*"]}},
        {"name": "l", "preset": "llamacpp", "url": "http://127.0.0.1:8003/v1",
         "models": [{"name": "small"}]},
        {"name": "c", "preset": "openai", "url": "http://127.0.0.1:8004/v1",
         "models": [{"name": "gpt"}]},
    ],
    "models": [{"name": "pub", "aliases": ["p"],
                "candidates": [{"backend": "v", "model": "base"}]},
               {"name": "two", "candidates": [{"backend": "l", "model": "small"},
                                              {"backend": "v", "model": "base"}]}],
})
SEER = Caps(frozenset({"vision"}), frozenset({"vision", "tools", "reasoning", "audio"}), True)


def test_the_table_merges_what_backends_list_with_the_config() -> None:
    catalog = Catalog({
        "v": (Found("base", Caps(frozenset(), frozenset({"tools"}), True), 4096),
              Found("lora-a", None, 4096)),
        "o": (Found("llava:7b", SEER, 8192), Found("nomic-embed", None)),
        "c": (Found("gpt"), Found("gpt-new")),  # discovery is off for a cloud API
    })
    t = RoutingTable(CFG, catalog)
    assert t.entries["lora-a"].candidates[0].backend == "v"
    assert "ollama/llava:7b" in t.entries and "ollama/nomic-embed" not in t.entries
    assert "gpt-new" not in t.entries
    assert t.has(t.entries["pub"].candidates[0], "tools")  # the config wins over the report
    seer = t.entries["ollama/llava:7b"].candidates[0]
    assert t.has(seer, "vision") and t.lacks(seer, "tools") and t.context[("o", "llava:7b")] \
        == 8192
    described = t.describe(seer)
    assert described["capabilities_from"] == "detected" and described["discovered"]
    assert t.describe(t.entries["pub"].candidates[0])["capabilities_from"] == "config"


def test_a_model_that_goes_away_stops_being_routed_there() -> None:
    listed = Catalog({"v": (Found("base"), Found("lora-a"))})
    gone = merge(merge(listed, "v", [Found("lora-a")]), "v", [])
    t = RoutingTable(CFG, gone)
    assert "lora-a" not in t.entries and "pub" not in t.entries and "p" not in t.aliases
    assert [c.backend for c in t.entries["two"].candidates] == ["l"]
    assert refused(route_request, t, {"model": "lora-a"})["code"] == "model_not_found"
    # A declared model the backend never listed (its own name for it may differ) stays.
    assert "pub" in RoutingTable(CFG, Catalog({"v": (Found("other"),)})).entries


def test_candidates_whose_context_is_too_small_go_last() -> None:
    t = RoutingTable(CFG, Catalog({"l": (Found("small", None, 100),)}))
    short = {"model": "two", "messages": [{"role": "user", "content": "hi"}]}
    assert [c.backend for c in route_request(t, short).candidates] == ["l", "v"]
    long = {"model": "two", "max_tokens": 50,
            "messages": [{"role": "user", "content": "x" * 400}]}
    assert estimate_tokens(long) == 150
    d = route_request(t, long)
    assert [c.backend for c in d.candidates] == ["v", "l"]
    assert d.context == {"estimated_tokens": 150, "too_small": ["l/small"]}


def test_which_server_a_url_is() -> None:
    ok = 200
    assert server_kind({"/api/version": (ok, j({"version": "0.14.1"}))})[0] == "ollama"
    assert server_kind({"/props": (ok, j({"default_generation_settings": {}}))})[0] == \
        "llamacpp"
    assert server_kind({"/get_model_info": (ok, j({"model_path": "m"}))})[0] == "sglang"
    assert server_kind({"/version": (ok, j({"version": "0.11.0"}))})[0] == "vllm"
    assert server_kind({"/version": (404, b"")})[0] == "openai"


async def test_a_failing_poll_changes_nothing_and_is_logged_once(caplog) -> None:
    answers = {"ok": True}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models" and request.url.port == 8001:
            return httpx.Response(200, json={"data": [{"id": "base"}, {"id": "lora-a"}]}) \
                if answers["ok"] else httpx.Response(200, text="<html>")
        if request.url.path == "/api/tags":
            return httpx.Response(200, json={"models": [{"name": "llava:7b", "digest": "d"}]})
        if request.url.path == "/api/show":
            return httpx.Response(200, json={"capabilities": ["completion", "vision"]})
        return httpx.Response(404)

    rt = Runtime.build(CFG, env={})
    d = Discoverer(httpx.MockTransport(handler))
    caplog.set_level(logging.INFO, logger="extproc")
    first = await d.poll(rt, 0.0)
    assert {f.name for f in first.listed["v"]} == {"base", "lora-a"}
    assert first.listed["o"][0].caps is not None and first.listed["o"][0].caps.has("vision")
    answers["ok"] = False
    interval = CFG.discovery.interval_s
    for k in range(1, 4):  # a garbage answer, then backing off
        assert await d.poll(rt, 1000.0 * k) is first
    failed = [r.fields for r in caplog.records if r.getMessage() == "discovery.failed"
              and r.fields["backend"] == "v"]  # (llama.cpp's list is a 404 here: failing too)
    assert len(failed) == 1 and "ValueError" in failed[0]["why"]
    assert d.backends["v"].failures == 3 and d.backends["v"].next_at > 3000 + interval
    answers["ok"] = True
    await d.poll(rt, 10_000.0)
    assert [r.fields["backend"] for r in caplog.records
            if r.getMessage() == "discovery.recovered"] == ["v"]
    await d.close()


async def test_a_model_card_that_failed_is_read_again() -> None:
    shows = {"status": 500}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/tags":
            return httpx.Response(200, json={"models": [{"name": "llava:7b", "digest": "d"}]})
        if request.url.path == "/api/show":
            return httpx.Response(shows["status"], json={"capabilities": ["completion",
                                                                          "vision"]})
        return httpx.Response(404)

    rt = Runtime.build(CFG, env={})
    d = Discoverer(httpx.MockTransport(handler))
    first = await d.poll(rt, 0.0)
    assert first.listed["o"][0].caps is None  # listed all the same, capabilities unknown
    shows["status"] = 200
    later = await d.poll(rt, 1000.0)
    assert later.listed["o"][0].caps is not None and later.listed["o"][0].caps.has("vision")
    await d.close()
