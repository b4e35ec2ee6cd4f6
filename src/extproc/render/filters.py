"""HTTP filters: the two ext_proc stages, client keys, the whole-response hold, the upstream
filter chains, and the access logs (one of which is the decision log back to the service)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..config import Config
from ..contract import (
    ATTEMPT_ATTRIBUTES,
    DECISION_HEADERS,
    DECISION_LOG_NAME,
    JUDGED_ATTRIBUTES,
    META_NS,
    OWN_RESPONSE_HEADERS,
    SERVICE_CLUSTER,
    STAGE_KEY,
    Meta,
    Stage,
    formatted,
)
from .common import EXT_PROC_TYPE, PROTOCOL_OPTIONS, ROUTER, dur


def _ext_proc(cfg: Config, stage: Stage, mode: dict[str, str], **extra: Any) -> dict[str, Any]:
    e = cfg.envoy
    return {
        "@type": EXT_PROC_TYPE,
        "grpc_service": {
            "envoy_grpc": {"cluster_name": SERVICE_CLUSTER},
            "initial_metadata": [{"key": STAGE_KEY, "value": stage.value}],
        },
        "failure_mode_allow": e.failure_mode_allow,
        "status_on_error": {"code": e.status_on_error},
        "processing_mode": {
            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP", **mode,
        },
        "message_timeout": dur(e.message_timeout_ms / 1000),
        "max_message_timeout": dur(e.max_message_timeout_ms / 1000),
        **extra,
    }


def route_stage(cfg: Config) -> dict[str, Any]:
    """Before the router: request headers and the whole body, never the response."""
    return {"name": "extproc.route", "typed_config": _ext_proc(
        cfg, Stage.ROUTE,
        {"request_header_mode": "SEND", "request_body_mode": "BUFFERED",
         "response_header_mode": "SKIP", "response_body_mode": "NONE"},
        mutation_rules={"allow_envoy": True},
        metadata_options={"receiving_namespaces": {"untyped": [META_NS]}})}


def attempt_stage(cfg: Config, judged_only: bool = False) -> dict[str, Any]:
    """In a backend cluster, on every attempt. Each attempt overrides the body modes to what it
    needs (the request body when it changes, the response body only to judge or hold it);
    ``judged_only``: the response side alone (requests prepared whole by the route stage)."""
    if judged_only:
        mode = {"request_header_mode": "SKIP", "request_body_mode": "NONE",
                "response_header_mode": "SEND", "response_body_mode": "STREAMED"}
        attributes: dict[str, Any] = {"response_attributes": list(JUDGED_ATTRIBUTES)}
    else:
        mode = {"request_header_mode": "SEND", "request_body_mode": "BUFFERED",
                "response_header_mode": "SEND", "response_body_mode": "STREAMED"}
        attributes = {"request_attributes": list(ATTEMPT_ATTRIBUTES)}
    return {"name": "extproc.attempt", "typed_config": _ext_proc(
        cfg, Stage.ATTEMPT, mode, allow_mode_override=True,
        send_body_without_waiting_for_header_response=True, **attributes)}


# Holds a non-streaming response until its body is complete. A backend that dies mid-body then
# gives the client a JSON 502 instead of a truncated 200 (which an SDK cannot parse). Streams
# pass live. In Lua: no service round trip and no gRPC message per request.
_WHOLE_RESPONSE_LUA = """
function envoy_on_response(handle)
  local ctype = handle:headers():get("content-type") or ""
  if not string.find(ctype, "text/event-stream", 1, true) then
    handle:body()
  end
end
"""


def whole_responses(cfg: Config) -> list[dict[str, Any]]:
    if not cfg.envoy.whole_responses:
        return []
    return [{"name": "extproc.whole_responses", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": _WHOLE_RESPONSE_LUA}}}]


def client_keys(cfg: Config, env: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(client, key) pairs from the config, the environment and the keys file."""
    ca = cfg.client_auth
    if ca is None:
        return []
    env = dict(os.environ) if env is None else env
    out = []
    for k in ca.keys:
        key = k.key if k.key is not None else env.get(k.key_env or "", "")
        if not key:
            raise ValueError(f"client_auth: no key for client {k.client!r} ({k.key_env} unset)")
        out.append((k.client, key))
    if ca.keys_file:
        data = yaml.safe_load(Path(ca.keys_file).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"client_auth.keys_file: {ca.keys_file} is not a mapping")
        out += [(str(c), str(k)) for c, k in data.items()]
    return out


def client_auth(cfg: Config) -> list[dict[str, Any]]:
    ca = cfg.client_auth
    if ca is None:
        return []
    return [{
        "name": "envoy.filters.http.api_key_auth",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3."
                     "ApiKeyAuth",
            "credentials": [{"key": key, "client": client} for client, key in client_keys(cfg)],
            "key_sources": [{"header": h} for h in dict.fromkeys([ca.header, *ca.also_headers])],
            # The service sees who is asking, never the key.
            "forwarding": {"header": ca.forward_header, "hide_credentials": True},
        },
    }]


def http_filters(cfg: Config) -> list[dict[str, Any]]:
    """The HCM's chain: client keys, the route stage, the whole-response hold, the router."""
    return [*client_auth(cfg), route_stage(cfg), *whole_responses(cfg), ROUTER]


def upstream_filters(stage: dict[str, Any] | None) -> dict[str, Any]:
    """A backend cluster's HTTP/1.1 options and upstream filters: the attempt stage (if any),
    then what strips a backend's copies of our response headers (responses pass upstream
    filters in reverse order: stripped first, then tagged by the attempt stage)."""
    strip = {"name": "extproc.strip_backend_tags", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3"
                 ".HeaderMutation",
        "mutations": {"response_mutations": [{"remove": h} for h in OWN_RESPONSE_HEADERS]}}}
    codec = {"name": "envoy.filters.http.upstream_codec", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3"
                 ".UpstreamCodec"}}
    return {PROTOCOL_OPTIONS: {
        "@type": f"type.googleapis.com/{PROTOCOL_OPTIONS}",
        "explicit_http_config": {"http_protocol_options": {}},
        "http_filters": [*([stage] if stage else []), strip, codec]}}


def decision_log(cfg: Config) -> dict[str, Any]:
    """Envoy's gRPC access log to the service: each request's decision record (dynamic
    metadata set by the route stage) comes back with the outcome, batched, off the request's
    path; the service writes the decision line and the request metrics from it."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": {"metadata_filter": {"matcher": {
            "filter": META_NS, "path": [{"key": Meta.RECORD.value}],
            "value": {"present_match": True}}}},
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3."
                     "HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": DECISION_LOG_NAME,
                "grpc_service": {"envoy_grpc": {"cluster_name": SERVICE_CLUSTER}},
                "transport_api_version": "V3",
                "buffer_flush_interval": dur(cfg.envoy.decision_log_flush_s),
            },
            # retry-after: a backend's 429 cools it down (health.py)
            "additional_response_headers_to_log": [*DECISION_HEADERS, "retry-after"],
        },
    }


def access_logs(cfg: Config) -> list[dict[str, Any]]:
    """The decision log, and Envoy's own JSON access log on stdout."""
    if not cfg.envoy.access_log:
        return [decision_log(cfg)]
    return [decision_log(cfg), {
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"json_format": {
                "event": "envoy.access",
                "ts": "%START_TIME%",
                "request_id": "%REQ(X-REQUEST-ID)%",
                "method": "%REQ(:METHOD)%",
                "path": "%REQ(:PATH)%",
                "status": "%RESPONSE_CODE%",
                "flags": "%RESPONSE_FLAGS%",
                "details": "%RESPONSE_CODE_DETAILS%",
                "public_model": formatted(Meta.PUBLIC_MODEL),
                "route_reason": formatted(Meta.ROUTE_REASON),
                "intent": formatted(Meta.INTENT),
                "upstream": "%UPSTREAM_HOST%",
                "backend": "%RESP(X-EXTPROC-BACKEND)%",
                "model": "%RESP(X-EXTPROC-MODEL)%",
                "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
                "bytes_in": "%BYTES_RECEIVED%",
                "bytes_out": "%BYTES_SENT%",
                "duration_ms": "%DURATION%",
            }},
        },
    }]
