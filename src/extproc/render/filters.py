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
from . import fast_lane
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
    """Before the router: request headers and the whole body; the response only for a
    request it translated whole for its one candidate (asked for per request)."""
    return {"name": "extproc.route", "typed_config": _ext_proc(
        cfg, Stage.ROUTE,
        {"request_header_mode": "SEND", "request_body_mode": "BUFFERED",
         "response_header_mode": "SKIP", "response_body_mode": "NONE"},
        mutation_rules={"allow_envoy": True},
        metadata_options={"receiving_namespaces": {"untyped": [META_NS]}},
        # (a request in an API it may translate: the answer's headers too, then its body
        # when the route stage translated the request: shell/route_stage.py)
        allow_mode_override=True)}


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


# The response side, in Lua (no service round trip, no gRPC message per request):
# - holds a non-streaming response until its body is complete (envoy.whole_responses), so a
#   backend that dies mid-body gives the client a JSON 502 instead of a truncated 200;
# - reads the answer's token usage (Chat/Completions prompt_tokens/completion_tokens,
#   Responses/Messages input_tokens/output_tokens; the last value seen wins, as a Messages
#   stream's final message_delta does) from the end of a whole body, or from every chunk of a
#   stream, joined to the end of the previous chunk so an event split across chunks is read;
# - notes when a stream's first token came (the first chunk with text, a tool call or a
#   delta) and when it ended (wall clock, as the access log's start time: the service
#   subtracts that).
# A compressed answer is passed on untouched (its usage is not read).
# Streams pass live: bodyChunks() hands each chunk on as it arrives.
_RESPONSES_LUA = """
local HOLD = %(hold)s
local USAGE = %(usage)s
local NS = "%(ns)s"

local function scan(text, usage)
  local at = string.find(text, '"usage"', 1, true)
  while at do
    local u = string.sub(text, at, at + 400)
    local n = string.match(u, '"prompt_tokens"%%s*:%%s*(%%d+)')
      or string.match(u, '"input_tokens"%%s*:%%s*(%%d+)')
    if n then usage.input = n end
    n = string.match(u, '"completion_tokens"%%s*:%%s*(%%d+)')
      or string.match(u, '"output_tokens"%%s*:%%s*(%%d+)')
    if n then usage.output = n end
    at = string.find(text, '"usage"', at + 7, true)
  end
end

-- A stream's complete events (up to its last blank line; SSE lines may end in CRLF) without
-- the usage chunk the gateway asked for (an event with "choices":[] and "usage"), and the
-- incomplete rest (an event the stream never ends is not an event: SSE clients drop it too).
local function without_usage(text)
  local cut, at, stop = nil, 1, nil
  while true do
    at, stop = string.find(text, "\\r?\\n\\r?\\n", at)
    if not at then break end
    cut, at = stop, stop + 1
  end
  if not cut then return "", text end
  local out = {}
  for event in string.gmatch(string.sub(text, 1, cut), "(.-\\r?\\n\\r?\\n)") do
    if not (string.find(event, '"choices":[]', 1, true)
            and string.find(event, '"usage"', 1, true)) then
      out[#out + 1] = event
    end
  end
  return table.concat(out), string.sub(text, cut + 1)
end

local function has_token(text)
  return string.find(text, '"content":"[^"]') or string.find(text, '"text":"[^"]')
    or string.find(text, '"delta":"[^"]') or string.find(text, '"tool_calls"', 1, true)
    or string.find(text, '"partial_json"', 1, true)
end

function envoy_on_response(handle)
  local ctype = handle:headers():get("content-type") or ""
  local stream = string.find(ctype, "text/event-stream", 1, true) ~= nil
  local encoding = handle:headers():get("content-encoding") or "identity"
  local usage, first, last = {}, nil, nil
  if not USAGE or encoding ~= "identity" then  -- (compressed: passed on as it is)
    if not stream then handle:body() end
    return
  end
  if HOLD and not stream then
    local body = handle:body()
    local n = body:length()
    local from = n > 4096 and n - 4096 or 0
    scan(body:getBytes(from, n - from), usage)
  else
    local tail, pending = "", ""
    local added = stream and (handle:streamInfo():dynamicMetadata():get(NS) or {})["%(added)s"]
    for chunk in handle:bodyChunks() do
      local n = chunk:length()
      if n > 0 then
        local raw = chunk:getBytes(0, n)
        if added then  -- (events are passed on whole: a piece waits for the rest)
          local out
          out, pending = without_usage(pending .. raw)
          chunk:setBytes(out)
        end
        local text = tail .. raw
        if stream and first == nil and has_token(text) then
          first = handle:timestampString(EnvoyTimestampResolution.MICROSECOND)
        end
        scan(text, usage)
        tail = string.sub(text, -512)
      end
    end
    if stream then last = handle:timestampString(EnvoyTimestampResolution.MICROSECOND) end
  end
  if usage.input or usage.output or first then
    -- (objects from before a yield are out of scope after it: the metadata is fetched here)
    local meta = handle:streamInfo():dynamicMetadata()
    if usage.input then meta:set(NS, "%(usage_in)s", usage.input) end
    if usage.output then meta:set(NS, "%(usage_out)s", usage.output) end
    if first then meta:set(NS, "%(first)s", first) end
    if last then meta:set(NS, "%(last)s", last) end
  end
end
"""


def responses_lua(cfg: Config) -> str:
    return _RESPONSES_LUA % {
        "hold": "true" if cfg.envoy.whole_responses else "false",
        "usage": "true" if cfg.envoy.token_usage else "false", "ns": META_NS,
        "usage_in": Meta.USAGE_IN, "usage_out": Meta.USAGE_OUT, "added": Meta.USAGE_ADDED,
        "first": Meta.FIRST_TOKEN_US, "last": Meta.LAST_US}


def responses(cfg: Config) -> list[dict[str, Any]]:
    if not (cfg.envoy.whole_responses or cfg.envoy.token_usage):
        return []
    if fast_lane.compiled(cfg):  # (the same work, compiled: lane/lane.c)
        return [fast_lane.module_filter(cfg, fast_lane.RESPONSES_FILTER, "answers")]
    return [{"name": fast_lane.RESPONSES_FILTER, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": responses_lua(cfg)}}}]


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
    """The HCM's chain: client keys, the fast lane's two (off unless its route turns them on),
    the route stage, the response-side Lua, the router."""
    return [*client_auth(cfg), *fast_lane.filters(cfg),
            fast_lane.unless_fast(cfg, route_stage(cfg)), *responses(cfg), ROUTER]


def upstream_filters(stage: dict[str, Any] | None, strip: bool = True) -> dict[str, Any]:
    """A backend cluster's HTTP/1.1 options and upstream filters: the attempt stage (if any),
    then what strips a backend's copies of our response headers (responses pass upstream
    filters in reverse order: stripped first, then tagged by the attempt stage). Without the
    strip (``strip=False``): the compiled lane's cluster, whose module strips and tags."""
    stripping = {"name": "extproc.strip_backend_tags", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3"
                 ".HeaderMutation",
        "mutations": {"response_mutations": [{"remove": h} for h in OWN_RESPONSE_HEADERS]}}}
    codec = {"name": "envoy.filters.http.upstream_codec", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3"
                 ".UpstreamCodec"}}
    return {PROTOCOL_OPTIONS: {
        "@type": f"type.googleapis.com/{PROTOCOL_OPTIONS}",
        "explicit_http_config": {"http_protocol_options": {}},
        "http_filters": [*([stage] if stage else []), *([stripping] if strip else []), codec]}}


def decision_log(cfg: Config) -> dict[str, Any]:
    """Envoy's gRPC access log to the service: each request's decision record (dynamic
    metadata set by the route stage) comes back with the outcome, batched, off the request's
    path; the service writes the decision line and the request metrics from it."""
    # (the route stage's record, or the Lua lane's mark: the service writes its record; the
    # compiled lane sends its own)
    keys = (Meta.RECORD,) if fast_lane.compiled(cfg) else (Meta.RECORD, Meta.FAST)
    # (a key not found matches unless told otherwise: Envoy 1.40 logged every request)
    present = [{"metadata_filter": {"matcher": {
        "filter": META_NS, "path": [{"key": key.value}], "value": {"present_match": True}},
        "match_if_key_not_found": False}} for key in keys]
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": present[0] if len(present) == 1 else {"or_filter": {"filters": present}},
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3."
                     "HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": DECISION_LOG_NAME,
                "grpc_service": {"envoy_grpc": {"cluster_name": SERVICE_CLUSTER}},
                "transport_api_version": "V3",
                "buffer_flush_interval": dur(cfg.envoy.decision_log_flush_s),
                # (Envoy's default, 16 KiB, sends a gRPC message every ~20 entries; each
                # message costs the service more than an entry does)
                "buffer_size_bytes": 1024 * 1024,
            },
            # retry-after: a backend's 429 cools it down (health.py)
            "additional_response_headers_to_log": [*DECISION_HEADERS, "retry-after"],
            # who asked (the token and latency metrics are per client)
            "additional_request_headers_to_log": [cfg.hints.client_header],
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
