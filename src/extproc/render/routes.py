"""The route config: where a request goes (the route stage's cluster header), how retries walk
its candidates, one route per streaming silence limit, and Envoy's own errors as JSON."""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..contract import (
    CLUSTER_HEADER,
    META_NS,
    RESP_ATTEMPTS,
    RESP_BACKEND,
    RESP_MODEL,
    RESP_WARNINGS,
    RETRY_HEADER,
    STREAM_HEADER,
    TAG_META,
    Meta,
    formatted,
)
from . import fast_lane
from .common import cel, dur

UPSTREAM_FLAGS = ["UF", "UH", "URX", "UT", "UO", "UC", "NR", "UMSDR", "UPE", "DC"]


def max_candidates(cfg: Config) -> int:
    counts = [len(m.candidates) for m in cfg.models]
    per_model: dict[str, int] = {}
    for b in cfg.backends:
        for m in b.models:
            per_model[m.name] = per_model.get(m.name, 0) + 1
    return max(counts + list(per_model.values()) + [1])


def stream_idle_limits(cfg: Config) -> list[int]:
    """Every silence limit (ms) a streaming request can get: Envoy's and each backend's and
    model's own. The route stage picks the largest of a request's candidates: one of these."""
    e = cfg.envoy
    return sorted({int(1000 * (m.stream_idle_s or b.stream_idle_s or e.stream_idle_s))
                   for b in cfg.backends for m in b.models} |
                  {int(1000 * (b.stream_idle_s or e.stream_idle_s)) for b in cfg.backends} |
                  {int(1000 * e.stream_idle_s)})  # (discovered models: their backend's)


def retry_policy(cfg: Config) -> dict[str, Any]:
    e = cfg.envoy
    out: dict[str, Any] = {
        # 429: the next candidate now (the service cools the backend down per Retry-After).
        "retry_on": "connect-failure,refused-stream,reset,5xx,retriable-headers,"
                    "retriable-status-codes",
        "num_retries": max(max_candidates(cfg) - 1, 0),
        "retriable_status_codes": [429],
        "retriable_headers": [{"name": RETRY_HEADER}],
        "retry_back_off": {
            "base_interval": dur(e.retry_base_interval_ms / 1000),
            "max_interval": dur(e.retry_max_interval_ms / 1000),
        },
    }
    if e.per_try_timeout_s:
        out["per_try_timeout"] = dur(e.per_try_timeout_s)
    return out


def routes(cfg: Config) -> list[dict[str, Any]]:
    """The fast lane's routes first (render/fast_lane.py). Then streams, one route per silence
    limit: no overall limit (a long answer is not a failure) and no per-try limit (Envoy stops
    it once the answer began anyway); an attempt silent for its limit is given up instead.
    Then every other request (the fast lane's reading route, a copy, just before)."""
    e = cfg.envoy
    policy = retry_policy(cfg)
    stream_policy = {k: v for k, v in policy.items() if k != "per_try_timeout"}
    limits = stream_idle_limits(cfg)
    default = {
        "match": {"prefix": "/"},
        **fast_lane.skipped(cfg),
        "request_body_buffer_limit": e.max_body_bytes,
        "request_headers_to_remove": [CLUSTER_HEADER],
        "route": {
            "cluster_header": CLUSTER_HEADER,
            "timeout": dur(e.route_timeout_s),
            "retry_policy": policy,
        },
    }
    fast, reading = fast_lane.routes(cfg, default, limits)
    ordinary = [*({
        "match": {"prefix": "/", "headers": [
            {"name": STREAM_HEADER, "string_match": {"exact": str(ms)}}]},
        "request_body_buffer_limit": e.max_body_bytes,
        "request_headers_to_remove": [CLUSTER_HEADER, STREAM_HEADER],
        "route": {"cluster_header": CLUSTER_HEADER, "timeout": "0s",
                  "retry_policy": {**stream_policy, "per_try_idle_timeout": dur(ms / 1000)}},
    } for ms in limits), *reading, default]
    if fast_lane.compiled(cfg):  # (the compiled lane tags its answers itself)
        added = tags()
        ordinary = [{**r, "response_headers_to_add": added} for r in ordinary]
    return [*fast, *ordinary]


def _added(key: str, value: str) -> dict[str, Any]:
    return {"header": {"key": key, "value": value}, "append_action": "ADD_IF_ABSENT",
            "keep_empty_value": False}


def tags() -> list[dict[str, Any]]:
    """Where a request went, for the client: the attempt stage names the backend of each
    attempt; for requests that skip it, the route stage's metadata does."""
    return [
        _added(RESP_BACKEND, formatted(Meta.BACKEND)),
        _added(RESP_MODEL, formatted(Meta.MODEL)),
        _added(RESP_WARNINGS, formatted(Meta.WARNINGS)),
        _added(RESP_ATTEMPTS, "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"),
        *(_added(h, formatted(key)) for h, key in TAG_META.items()),
    ]


def route_config(cfg: Config) -> dict[str, Any]:
    return {
        "name": "llm",
        # Only the route stage sets these: a client's copies are removed on arrival.
        "internal_only_headers": [CLUSTER_HEADER, RETRY_HEADER, STREAM_HEADER],
        "virtual_hosts": [{
            "name": "llm",
            "domains": ["*"],
            "include_request_attempt_count": True,
            # (per route instead with the compiled lane: its routes pay for no formatter)
            **({} if fast_lane.compiled(cfg) else {"response_headers_to_add": tags()}),
            "routes": routes(cfg),
        }],
    }


def _json_error(error: dict[str, str]) -> dict[str, Any]:
    return {"json_format": {"error": error}, "content_type": "application/json"}


def _anthropic(mapper: dict[str, Any]) -> dict[str, Any]:
    """The same mapper for Anthropic Messages clients: their error envelope, on their paths."""
    error = dict(mapper["body_format_override"]["json_format"]["error"])
    error["type"] = "api_error"
    # (the path the client called: the route stage rewrites it for a request it translated
    # whole, and says so in the hand-off's endpoint)
    on_path = {"or_filter": {"filters": [
        {"header_filter": {"header": {"name": ":path", "string_match": {
            "prefix": "/v1/messages"}}}},
        {"metadata_filter": {"matcher": {"filter": META_NS, "path": [{"key": Meta.ENDPOINT.value}],
                                         "value": {"string_match": {"prefix": "/v1/messages"}}},
                             "match_if_key_not_found": False}}]}}
    return {**mapper, "filter": {"and_filter": {"filters": [on_path, mapper["filter"]]}},
            "body_format_override": {"json_format": {"type": "error", "error": error},
                                     "content_type": "application/json"}}


def local_replies(cfg: Config) -> dict[str, Any]:
    """Envoy's own errors as OpenAI-style JSON (Anthropic's envelope on /v1/messages):
    upstream failures name the model; the service being down, bodies over the limit and slow
    clients get a JSON error too (never a bare body). The service's own answers (details
    ``llm_extproc``) and backends' answers pass untouched."""
    ours = "response.code_details == 'llm_extproc' || response.code_details == 'via_upstream'"
    model = formatted(Meta.PUBLIC_MODEL)
    mappers: list[dict[str, Any]] = [{
        # A non-streaming answer is held whole (whole_responses): one over the buffer limit is
        # the backend's failure to answer usably, not ours: a 502 that says so.
        "filter": cel("response.code_details == 'response_payload_too_large'"),
        "status_code": 502,
        "body_format_override": _json_error({
            "message": f"the answer for model '{model}' is larger than "
            f"{cfg.envoy.max_body_bytes} bytes (envoy.max_body_bytes), the most a "
            "non-streaming answer may be; ask with \"stream\": true, or raise the limit",
            "type": "upstream_error",
            "code": "response_too_large",
            "model": model,
            "request_id": "%REQ(X-REQUEST-ID)%",
        }),
    }, {
        "filter": {"response_flag_filter": {"flags": UPSTREAM_FLAGS}},
        "body_format_override": _json_error({
            "message": f"upstream failure for model '{model}': %LOCAL_REPLY_BODY%",
            "type": "upstream_error",
            "code": "%RESPONSE_CODE_DETAILS%",
            "model": model,
            "request_id": "%REQ(X-REQUEST-ID)%",
        }),
    }, {
        # The service failed or cannot be reached: say so, without gRPC's internals (they stay
        # in Envoy's access log, under details).
        "filter": cel("response.code_details.startsWith('ext_proc_error')"),
        "body_format_override": _json_error({
            "message": "the gateway's request processing (llm-extproc) failed or is "
            "unreachable; the request was not forwarded",
            "type": "gateway_error",
            "code": "gateway_processing_failed",
            "request_id": "%REQ(X-REQUEST-ID)%",
        }),
    }, {
        "filter": cel(f"!({ours})"),
        "body_format_override": _json_error({
            "message": "%LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)",
            "type": "gateway_error",
            "code": "%RESPONSE_CODE_DETAILS%",
            "request_id": "%REQ(X-REQUEST-ID)%",
        }),
    }]
    return {"mappers": [*map(_anthropic, mappers), *mappers]}
