"""Render the complete Envoy bootstrap from the service config, so the two never disagree.

Layout (see ../shared/design/architecture.md and ordering.md):
- listener -> HCM -> [ext_proc route stage] -> router; the route picks its cluster from the
  ``x-extproc-cluster`` header, which only the route stage can set (internal_only_headers).
- one pool cluster holding every backend endpoint; the override-host LB policy takes the
  per-request endpoint order from the route stage's dynamic metadata and walks it on retries.
- the pool's upstream filter chain runs the attempt stage on every attempt, retries included.
"""

from __future__ import annotations

from typing import Any

import yaml

from ..config import Config, backend_endpoint, pool_addresses
from ..core.routing import DIRECT_CLUSTER, JUDGED_CLUSTER, POOL_CLUSTER
from ..shell.protocol import (
    ATTEMPT_ATTRIBUTES,
    CLUSTER_HEADER,
    DECISION_HEADERS,
    DECISION_LOG_NAME,
    JUDGED_ATTRIBUTES,
    META_NS,
    RESP_ATTEMPTS,
    RESP_BACKEND,
    RESP_MODEL,
    RESP_WARNINGS,
    RETRY_HEADER,
    STAGE_KEY,
    STREAM_HEADER,
    TAG_META,
)

SERVICE_CLUSTER = "extproc_service"
EXT_PROC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
UPSTREAM_FLAGS = ["UF", "UH", "URX", "UT", "UO", "UC", "NR", "UMSDR", "UPE", "DC"]


def _dur(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _sock(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _ext_proc(cfg: Config, stage: str, mode: dict[str, str], **extra: Any) -> dict[str, Any]:
    e = cfg.envoy
    return {
        "@type": EXT_PROC_TYPE,
        "grpc_service": {
            "envoy_grpc": {"cluster_name": SERVICE_CLUSTER},
            "initial_metadata": [{"key": STAGE_KEY, "value": stage}],
        },
        "failure_mode_allow": e.failure_mode_allow,
        "status_on_error": {"code": e.status_on_error},
        "processing_mode": {
            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP", **mode,
        },
        "message_timeout": _dur(e.message_timeout_ms / 1000),
        "max_message_timeout": _dur(e.max_message_timeout_ms / 1000),
        **extra,
    }


def _header(key: str, value: str) -> dict[str, Any]:
    return {"header": {"key": key, "value": value}, "append_action": "ADD_IF_ABSENT",
            "keep_empty_value": False}


def _cel(expression: str) -> dict[str, Any]:
    return {"extension_filter": {
        "name": "envoy.access_loggers.extension_filters.cel",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3."
                     "ExpressionFilter",
            "expression": expression}}}


def _local_reply(cfg: Config) -> dict[str, Any]:
    """Envoy's own errors as OpenAI-style JSON: upstream failures name the model; the service
    being down, bodies over the limit and slow clients get a JSON error too (never a bare body).
    The service's own answers (details ``llm_extproc``) and backends' answers pass untouched."""
    ours = "response.code_details == 'llm_extproc' || response.code_details == 'via_upstream'"
    model = f"%DYNAMIC_METADATA({META_NS}:public_model)%"
    return {
        "mappers": [{
            # A non-streaming answer is held whole (whole_responses): one over the buffer limit
            # is the backend's failure to answer usably, not ours: a 502 that says so.
            "filter": _cel("response.code_details == 'response_payload_too_large'"),
            "status_code": 502,
            "body_format_override": {
                "json_format": {
                    "error": {
                        "message": f"the answer for model '{model}' is larger than "
                        f"{cfg.envoy.max_body_bytes} bytes (envoy.max_body_bytes), the most a "
                        "non-streaming answer may be; ask with \"stream\": true, or raise the "
                        "limit",
                        "type": "upstream_error",
                        "code": "response_too_large",
                        "model": model,
                        "request_id": "%REQ(X-REQUEST-ID)%",
                    }
                },
                "content_type": "application/json",
            },
        }, {
            "filter": {"response_flag_filter": {"flags": UPSTREAM_FLAGS}},
            "body_format_override": {
                "json_format": {
                    "error": {
                        "message": "upstream failure for model "
                        f"'%DYNAMIC_METADATA({META_NS}:public_model)%': %LOCAL_REPLY_BODY%",
                        "type": "upstream_error",
                        "code": "%RESPONSE_CODE_DETAILS%",
                        "model": f"%DYNAMIC_METADATA({META_NS}:public_model)%",
                        "request_id": "%REQ(X-REQUEST-ID)%",
                    }
                },
                "content_type": "application/json",
            },
        }, {
            # The service failed or cannot be reached: say so, without gRPC's internals (they
            # stay in Envoy's access log, under details).
            "filter": _cel("response.code_details.startsWith('ext_proc_error')"),
            "body_format_override": {
                "json_format": {
                    "error": {
                        "message": "the gateway's request processing (llm-extproc) failed or "
                        "is unreachable; the request was not forwarded",
                        "type": "gateway_error",
                        "code": "gateway_processing_failed",
                        "request_id": "%REQ(X-REQUEST-ID)%",
                    }
                },
                "content_type": "application/json",
            },
        }, {
            "filter": _cel(f"!({ours})"),
            "body_format_override": {
                "json_format": {
                    "error": {
                        "message": "%LOCAL_REPLY_BODY% (%RESPONSE_CODE_DETAILS%)",
                        "type": "gateway_error",
                        "code": "%RESPONSE_CODE_DETAILS%",
                        "request_id": "%REQ(X-REQUEST-ID)%",
                    }
                },
                "content_type": "application/json",
            },
        }]
    }


def _access_log() -> list[dict[str, Any]]:
    return [{
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
                "public_model": f"%DYNAMIC_METADATA({META_NS}:public_model)%",
                "route_reason": f"%DYNAMIC_METADATA({META_NS}:route_reason)%",
                "intent": f"%DYNAMIC_METADATA({META_NS}:intent)%",
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


def _whole_responses(cfg: Config) -> list[dict[str, Any]]:
    if not cfg.envoy.whole_responses:
        return []
    return [{"name": "extproc.whole_responses", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
        "default_source_code": {"inline_string": _WHOLE_RESPONSE_LUA}}}]


def _attempt_stage(cfg: Config, mode: dict[str, str], **attributes: Any) -> dict[str, Any]:
    return {"name": "extproc.attempt", "typed_config": _ext_proc(
        cfg, "attempt", mode, allow_mode_override=True,
        send_body_without_waiting_for_header_response=True, **attributes)}


# Our response headers, and the retry trigger: never a backend's own (the route adds its values
# only where absent, and the router retries on RETRY_HEADER).
OWN_RESPONSE_HEADERS = (*DECISION_HEADERS, RESP_WARNINGS, RESP_ATTEMPTS, RETRY_HEADER)


def _upstream_filters(attempt_stage: dict[str, Any] | None) -> dict[str, Any]:
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
        "http_filters": [*([attempt_stage] if attempt_stage else []), strip, codec]}}


def _decision_log(cfg: Config) -> dict[str, Any]:
    """Envoy's gRPC access log to the service: each request's decision record (dynamic
    metadata set by the route stage) comes back with the outcome, batched, off the request's
    path; the service writes the decision line and the request metrics from it."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": {"metadata_filter": {"matcher": {
            "filter": META_NS, "path": [{"key": "record"}], "value": {"present_match": True}}}},
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3."
                     "HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": DECISION_LOG_NAME,
                "grpc_service": {"envoy_grpc": {"cluster_name": SERVICE_CLUSTER}},
                "transport_api_version": "V3",
                "buffer_flush_interval": _dur(cfg.envoy.decision_log_flush_s),
            },
            # retry-after: a backend's 429 cools it down (health.py)
            "additional_response_headers_to_log": [*DECISION_HEADERS, "retry-after"],
        },
    }


def client_keys(cfg: Config, env: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(client, key) pairs from the config, the environment and the keys file."""
    import os
    from pathlib import Path

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


def _client_auth(cfg: Config) -> list[dict[str, Any]]:
    ca = cfg.client_auth
    if ca is None:
        return []
    return [{
        "name": "envoy.filters.http.api_key_auth",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3."
                     "ApiKeyAuth",
            "credentials": [{"key": key, "client": client} for client, key in client_keys(cfg)],
            "key_sources": [{"header": ca.header}],
            # The service sees who is asking, never the key.
            "forwarding": {"header": ca.forward_header, "hide_credentials": True},
        },
    }]


def _circuit_breakers(cfg: Config) -> dict[str, Any]:
    """Sized so that failover is never refused under load (Envoy's default allows three retries
    in flight per cluster); the budget bounds retries by the requests in flight instead."""
    e = cfg.envoy
    return {"thresholds": [{
        "priority": "DEFAULT",
        "max_connections": e.max_connections,
        "max_pending_requests": e.max_pending_requests,
        "max_requests": e.max_requests,
        "retry_budget": {"budget_percent": {"value": e.retry_budget_percent},
                         "min_retry_concurrency": e.min_retry_concurrency},
    }]}


def stream_idle_limits(cfg: Config) -> list[int]:
    """Every silence limit (ms) a streaming request can get: Envoy's and each backend's and
    model's own. The route stage picks the largest of a request's candidates: one of these."""
    e = cfg.envoy
    return sorted({int(1000 * (m.stream_idle_s or b.stream_idle_s or e.stream_idle_s))
                   for b in cfg.backends for m in b.models} | {int(1000 * e.stream_idle_s)})


def max_candidates(cfg: Config) -> int:
    counts = [len(m.candidates) for m in cfg.models]
    per_model: dict[str, int] = {}
    for b in cfg.backends:
        for m in b.models:
            per_model[m.name] = per_model.get(m.name, 0) + 1
    return max(counts + list(per_model.values()) + [1])


def render(cfg: Config) -> dict[str, Any]:
    e = cfg.envoy
    service_host = e.service_host or cfg.service.host
    if service_host in ("0.0.0.0", "::"):
        service_host = "127.0.0.1"
    retry_policy: dict[str, Any] = {
        # 429: the next candidate now (the service cools the backend down per Retry-After).
        "retry_on": "connect-failure,refused-stream,reset,5xx,retriable-headers,"
                    "retriable-status-codes",
        "num_retries": max(max_candidates(cfg) - 1, 0),
        "retriable_status_codes": [429],
        "retriable_headers": [{"name": RETRY_HEADER}],
        "retry_back_off": {
            "base_interval": _dur(e.retry_base_interval_ms / 1000),
            "max_interval": _dur(e.retry_max_interval_ms / 1000),
        },
    }
    if e.per_try_timeout_s:
        retry_policy["per_try_timeout"] = _dur(e.per_try_timeout_s)
    # Streams: no overall limit (a long answer is not a failure) and no per-try limit (it
    # would cut the stream); an attempt silent for its idle limit is given up instead. One
    # route per limit configured; the route stage picks it with STREAM_HEADER.
    stream_policy = {k: v for k, v in retry_policy.items() if k != "per_try_timeout"}
    stream_routes = [{
        "match": {"prefix": "/", "headers": [
            {"name": STREAM_HEADER, "string_match": {"exact": str(ms)}}]},
        "request_body_buffer_limit": e.max_body_bytes,
        "request_headers_to_remove": [CLUSTER_HEADER, STREAM_HEADER],
        "route": {"cluster_header": CLUSTER_HEADER, "timeout": "0s",
                  "retry_policy": {**stream_policy, "per_try_idle_timeout": _dur(ms / 1000)}},
    } for ms in stream_idle_limits(cfg)]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
        ".v3.HttpConnectionManager",
        "stat_prefix": "llm",
        "always_set_request_id_in_response": True,
        "request_timeout": _dur(e.request_timeout_s),
        "request_headers_timeout": _dur(e.request_headers_timeout_s),
        "stream_idle_timeout": _dur(e.stream_idle_timeout_s),
        "local_reply_config": _local_reply(cfg),
        "route_config": {
            "name": "llm",
            "internal_only_headers": [CLUSTER_HEADER, RETRY_HEADER, STREAM_HEADER],
            "virtual_hosts": [{
                "name": "llm",
                "domains": ["*"],
                "include_request_attempt_count": True,
                # Where a request went, for the client: the attempt stage names the backend of
                # each attempt; for requests that skip it, the route stage's metadata does.
                "response_headers_to_add": [
                    _header(RESP_BACKEND, f"%DYNAMIC_METADATA({META_NS}:backend)%"),
                    _header(RESP_MODEL, f"%DYNAMIC_METADATA({META_NS}:model)%"),
                    _header(RESP_WARNINGS, f"%DYNAMIC_METADATA({META_NS}:warnings)%"),
                    _header(RESP_ATTEMPTS, "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"),
                    *(_header(h, f"%DYNAMIC_METADATA({META_NS}:{key})%")
                      for h, key in TAG_META.items()),
                ],
                "routes": [*stream_routes, {
                    "match": {"prefix": "/"},
                    "request_body_buffer_limit": e.max_body_bytes,
                    "request_headers_to_remove": [CLUSTER_HEADER],
                    "route": {
                        "cluster_header": CLUSTER_HEADER,
                        "timeout": _dur(e.route_timeout_s),
                        "retry_policy": retry_policy,
                    },
                }],
            }],
        },
        "http_filters": [
            *_client_auth(cfg),
            {
                "name": "extproc.route",
                "typed_config": _ext_proc(
                    cfg, "route",
                    {"request_header_mode": "SEND", "request_body_mode": "BUFFERED",
                     "response_header_mode": "SKIP", "response_body_mode": "NONE"},
                    mutation_rules={"allow_envoy": True},
                    metadata_options={"receiving_namespaces": {"untyped": [META_NS]}},
                ),
            },
            *_whole_responses(cfg),
            {"name": "envoy.filters.http.router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }
    hcm["access_log"] = [_decision_log(cfg), *(_access_log() if e.access_log else [])]
    endpoints = []
    for b in cfg.backends:
        host, port = pool_addresses(cfg)[b.name].rsplit(":", 1)
        endpoints.append({
            "endpoint": {"address": _sock(host, int(port))},
            "metadata": {"filter_metadata": {"llm": {"backend": b.name}}},
        })
    pool = {
        "name": POOL_CLUSTER,
        "type": "STATIC",
        "connect_timeout": _dur(e.connect_timeout_s),
        "per_connection_buffer_limit_bytes": e.max_body_bytes,
        "circuit_breakers": _circuit_breakers(cfg),
        "load_assignment": {"cluster_name": POOL_CLUSTER, "endpoints": [{"lb_endpoints": endpoints}]},
        "load_balancing_policy": {"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.override_host",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies"
                ".override_host.v3.OverrideHost",
                "override_host_sources": [{"metadata": {"key": META_NS, "path": [{"key": "hosts"}]}}],
                "fallback_policy": {"policies": [{"typed_extension_config": {
                    "name": "envoy.load_balancing_policies.round_robin",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies"
                        ".round_robin.v3.RoundRobin"},
                }}]},
            },
        }}]},
        # Each attempt overrides the body modes to what it needs: the request body when it
        # changes, the response body only to judge a forced need or hold a response.
        "typed_extension_protocol_options": _upstream_filters(_attempt_stage(
            cfg, {"request_header_mode": "SEND", "request_body_mode": "BUFFERED",
                  "response_header_mode": "SEND", "response_body_mode": "STREAMED"},
            request_attributes=list(ATTEMPT_ATTRIBUTES))),
    }
    clusters = [pool]
    if e.direct_cluster:
        # Twins of the pool for requests the route stage prepared whole (nothing differs
        # between candidates): the same endpoints and per-request order, without the attempt
        # stage, or with its response side only (to judge a forced capability, or to hold a
        # response until complete while another candidate remains).
        judge = _attempt_stage(
            cfg, {"request_header_mode": "SKIP", "request_body_mode": "NONE",
                  "response_header_mode": "SEND", "response_body_mode": "STREAMED"},
            response_attributes=list(JUDGED_ATTRIBUTES))
        for name, options in ((DIRECT_CLUSTER, _upstream_filters(None)),
                              (JUDGED_CLUSTER, _upstream_filters(judge))):
            clusters.append({**pool, "name": name, "typed_extension_protocol_options": options,
                             "load_assignment": {**pool["load_assignment"],
                                                 "cluster_name": name}})
    service = {
        "name": SERVICE_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        # Multi-MB bodies share this HTTP/2 connection. With the default 1 MiB buffer limit its
        # watermark fires under concurrent large bodies and Envoy 1.40 segfaults in the upstream
        # (attempt-stage) ext_proc filter; measured: 4 MB bodies at concurrency 2+ crash it.
        "per_connection_buffer_limit_bytes": 4 * e.max_body_bytes,
        # Each client request holds up to two streams here (route and attempt stages).
        "circuit_breakers": _circuit_breakers(cfg),
        "load_assignment": {"cluster_name": SERVICE_CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _sock(service_host, cfg.service.port + i)}}
            for i in range(cfg.service.workers)]}]},
        "typed_extension_protocol_options": {PROTOCOL_OPTIONS: {
            "@type": f"type.googleapis.com/{PROTOCOL_OPTIONS}",
            "explicit_http_config": {"http2_protocol_options": {}},
        }},
    }
    egress_listeners, egress_clusters = _egress(cfg)
    return {
        "admin": {"address": _sock(e.admin_host, e.admin_port)},
        "static_resources": {
            "listeners": [*egress_listeners, {
                "name": "llm",
                "address": _sock(e.listen_host, e.listen_port),
                "per_connection_buffer_limit_bytes": e.max_body_bytes,
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm,
                }]}],
            }],
            "clusters": [service, *clusters, *egress_clusters],
        },
    }


def _egress(cfg: Config) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A loopback listener per backend reached by host name or over TLS: the pool's endpoint
    for it (an IP:port, as the per-request order needs) forwards to a DNS cluster that
    verifies the backend's certificate and sends its host name (SNI and Host)."""
    e, listeners, clusters = cfg.envoy, [], []
    for b in cfg.backends:
        ep = backend_endpoint(b.url)
        if not ep.needs_egress:
            continue
        name = f"egress_{b.name}"
        port = int(pool_addresses(cfg)[b.name].rsplit(":", 1)[1])
        cluster: dict[str, Any] = {
            "name": name,
            "type": "LOGICAL_DNS",
            "dns_lookup_family": "V4_PREFERRED",
            "connect_timeout": _dur(e.connect_timeout_s),
            "per_connection_buffer_limit_bytes": e.max_body_bytes,
            "circuit_breakers": _circuit_breakers(cfg),
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": _sock(ep.hostname, ep.port)}}]}]},
        }
        if ep.scheme == "https":
            cluster["transport_socket"] = {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                             "UpstreamTlsContext",
                    "sni": ep.hostname,
                    "common_tls_context": {"validation_context": {
                        "trusted_ca": {"filename": b.tls_ca_file or e.ca_bundle},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": ep.hostname}}],
                    }},
                },
            }
        clusters.append(cluster)
        listeners.append({
            "name": name,
            "address": _sock("127.0.0.1", port),
            "per_connection_buffer_limit_bytes": e.max_body_bytes,
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network."
                             "http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": name,
                    "local_reply_config": {"body_format": {
                        "json_format": {"error": {
                            "message": f"backend '{b.name}' ({ep.hostname}) failed: "
                                       "%LOCAL_REPLY_BODY%",
                            "type": "upstream_error", "code": "%RESPONSE_CODE_DETAILS%",
                            "backend": b.name}},
                        "content_type": "application/json"}},
                    "route_config": {"virtual_hosts": [{"name": name, "domains": ["*"],
                                                        "routes": [{
                        "match": {"prefix": "/"},
                        "route": {"cluster": name, "timeout": _dur(e.route_timeout_s),
                                  "auto_host_rewrite": True}}]}]},
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3."
                                 "Router"}}],
                }}]}],
        })
    return listeners, clusters


def render_yaml(cfg: Config, source: str | None = None) -> str:
    head = "# Rendered by `extproc envoy` from the service config"
    head += f" ({source}).\n" if source else ".\n"
    head += "# Do not edit by hand: change the service config and render again.\n"
    return head + yaml.safe_dump(render(cfg), sort_keys=False, width=100)


SNIPPETS_BEGIN = "<!-- snippets:begin (generated by `extproc envoy --snippets`) -->"
SNIPPETS_END = "<!-- snippets:end -->"


def render_snippets(cfg: Config) -> str:
    """The pieces an existing Envoy needs, as Markdown with YAML blocks (for the README)."""
    doc = render(cfg)
    hcm = doc["static_resources"]["listeners"][-1]["filter_chains"][0]["filters"][0][
        "typed_config"]
    service, *rest = doc["static_resources"]["clusters"]
    keys = ("name", "circuit_breakers", "load_balancing_policy",
            "typed_extension_protocol_options")
    pool_part = {"clusters": [{k: c[k] for k in keys} for c in rest
                              if c["name"] in (POOL_CLUSTER, DIRECT_CLUSTER, JUDGED_CLUSTER)]}

    def block(title: str, value: object) -> str:
        text = yaml.safe_dump(value, sort_keys=False, width=100)
        return f"{title}\n\n```yaml\n{text}```\n"

    return "\n".join([
        SNIPPETS_BEGIN,
        block("1. In your HTTP connection manager: the route stage before the router, and the "
              "access log that brings each decision record back to the service with its "
              "outcome.", {"http_filters": hcm["http_filters"],
                           "access_log": hcm["access_log"][:1]}),
        block("2. Its route config: the cluster comes from a header only the route stage can "
              "set; retries walk the candidates.", {"route_config": hcm["route_config"]}),
        block("3. The backend pool clusters: per-request endpoint order and the attempt stage "
              "on every attempt, and its twins for requests the route stage prepared whole: "
              "without the attempt stage, and with its response side only; all three drop a "
              "backend's copies of our response headers (add your `type`, `connect_timeout` "
              "and the same endpoints to all three: one per backend, by IP address).",
              pool_part),
        block("4. The service itself, over HTTP/2 (keep its buffer limit well above your "
              "largest body).", service),
        SNIPPETS_END,
    ])
