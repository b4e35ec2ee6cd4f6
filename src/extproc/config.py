"""The one configuration: backends, public models, limits. Envoy's config is rendered from it.

Loading validates with pydantic, then checks cross-references (candidates naming backends and
models that exist, names that collide) and reports every problem with the path of the bad key,
e.g. ``backends[1].models[0].name: field required``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")


class ConfigError(Exception):
    """Every problem found in a config, each as ``path: message``."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


CAPABILITIES = ("tools", "vision", "audio", "json", "reasoning")
# Client headers a backend never needs and must not see: session cookies, proxy and cloud
# provider credentials (a backend's own key is set per attempt), client certificates.
DEFAULT_STRIPPED_HEADERS = (
    "cookie", "proxy-authorization", "x-goog-api-key", "x-amz-security-token",
    "ocp-apim-subscription-key", "x-forwarded-client-cert")


class AttemptLimits(_Strict):
    """How long one attempt at a backend may take before the next candidate is tried; unset
    fields take the backend's, then the envoy section's values."""

    attempt_timeout_s: float | None = Field(
        default=None, gt=0, description="a non-streaming attempt (headers come with the "
        "whole answer, so minutes can be normal)")
    stream_idle_s: float | None = Field(
        default=None, gt=0, description="a streaming attempt that sends nothing (no headers, "
        "no next byte) for this long is given up")


class BackendModel(AttemptLimits):
    """A model as the backend knows it."""

    name: str = Field(description="the model name the backend expects in the request body")
    capabilities: list[str] | None = Field(
        default=None, description="what the model can do (tools, vision, audio, json, "
        "reasoning, or a name from extra_capabilities); unset means unknown")
    tags: list[str] = Field(default=[], description="free-form tags (local, cloud, free...)")
    context_length: int | None = Field(default=None, gt=0, description="tokens of context "
                                       "(unset: what discovery finds, else unknown)")


class BackendDiscovery(_Strict):
    """Polling a backend's model list (and, where it reports them, capabilities and context):
    models it lists become routable without a config edit, and stop being routed there when
    it stops listing them."""

    enabled: bool | None = Field(default=None, description="poll this backend (unset: on for "
                                 "vllm, sglang, llamacpp and ollama, off for openai and azure)")
    include: list[str] = Field(default=[], description="globs on the backend's model names: "
                               "only these are exposed (empty: all)")
    exclude: list[str] = Field(default=[], description="globs of names never exposed")
    prefix: str = Field(default="", description="put before a discovered model's name to make "
                        "its public name (e.g. 'ollama/')")


class DiscoverySettings(_Strict):
    """How often backends with discovery on are asked for their models."""

    interval_s: float = Field(default=30.0, gt=0, le=3600, description="how often each backend "
                              "is asked for its models")
    timeout_s: float = Field(default=5.0, gt=0, le=60, description="one discovery request")
    max_backoff_s: float = Field(default=300.0, gt=0, description="a failing backend is asked "
                                 "less often, doubling up to this")


class BackendHealth(_Strict):
    """A backend's health probe; unset fields keep its preset's (vLLM, SGLang, llama.cpp:
    /health; Ollama: /api/version; OpenAI-style cloud APIs: no probe)."""

    probe: bool | None = Field(default=None, description="probe this backend at all")
    path: str | None = Field(default=None, description="GET this path on the backend's host "
                             "(not under its base path); any 2xx is healthy")


class PartsOverride(_Strict):
    """Overrides of a preset's content-part profile; unset fields keep the preset's value."""

    accepts: list[str] | None = Field(default=None, description="part shapes taken natively")
    audio_formats: list[str] | None = Field(default=None, description="input_audio formats")
    fetches_urls: bool | None = Field(default=None, description="downloads http(s) URLs itself")
    image_mimes: list[str] | None = Field(default=None, description="data-URL image subtypes")
    keeps_detail: bool | None = Field(
        default=None, description="the backend takes image_url.detail (else it is dropped)")
    metadata: Literal["accept", "with_store"] | None = Field(
        default=None, description="with_store: `metadata` only when `store` is true (OpenAI)")
    check_urls: bool | None = Field(
        default=None, description="a backend that fetches URLs itself gets only URLs our "
        "fetch policy allows (default true; false hands them on unchecked)")

    @field_validator("accepts")
    @classmethod
    def _shapes(cls, v: list[str] | None) -> list[str] | None:
        from .core.parts import SHAPES

        for shape in v or ():
            if shape not in SHAPES:
                raise ValueError(f"unknown part shape {shape!r} (known: {', '.join(sorted(SHAPES))})")
        return v


class FetchSettings(_Strict):
    """Remote URL fetches (for backends that only take inline data)."""

    timeout_s: float = Field(default=10.0, gt=0, description="one fetch of a media URL, all of it")
    max_bytes: int = Field(default=20 * 1024 * 1024, ge=1024, description="largest media file fetched")
    allow_private: bool = Field(default=False, description="allow loopback/private/link-local")
    allow_hosts: list[str] = Field(default=[], description="hosts exempt from the address check")
    allow_http: bool = Field(default=False, description="fetch plain http:// URLs too (default: https only)")
    max_redirects: int = Field(
        default=3, ge=0, le=10, description="redirects followed (each target passes the policy again)")
    ca_bundle: str | None = Field(
        default=None, description="CA certificates for fetched https URLs (default: the system's)")
    max_urls_per_request: int = Field(default=16, ge=1, description="remote media URLs in "
                                      "one request (fetched, or checked for a backend)")
    max_bytes_per_request: int = Field(default=32 * 1024 * 1024, ge=1024,
                                       description="all media fetched for one request")
    concurrency: int = Field(default=8, ge=1, description="fetches at once per service "
                             "process, taken in turn by the requests waiting")


ApiName = Literal["chat", "completions", "embeddings", "responses", "messages", "count_tokens",
                  "transcriptions", "translations", "speech", "images", "rerank", "score"]


class Backend(AttemptLimits):
    """One server the gateway sends requests to, with its credentials and models."""

    name: str = Field(description="the backend's name (candidates, hints and records use it)")
    url: str = Field(description="base URL, e.g. http://127.0.0.1:8000/v1 (two backends cannot "
                     "share one host:port: list both models under one backend)")
    api_key_env: str | None = Field(
        default=None, description="environment variable holding this backend's API key"
    )
    auth_header: str = Field(default="authorization", description="header carrying the backend's key")
    auth_scheme: str = Field(
        default="Bearer", description="scheme before the key in that header (empty: the key alone)")
    forward_client_auth: bool = Field(
        default=False,
        description="forward the client's Authorization when the backend has no key of its own",
    )
    preset: Literal["vllm", "sglang", "llamacpp", "ollama", "openai", "azure"] = Field(
        default="openai", description="which server this is; sets its content-part profile, "
        "the APIs it speaks and (azure) its paths and key header")
    apis: list[ApiName] | None = Field(
        default=None, description="the APIs this backend speaks, instead of its preset's (a "
        "request for Responses or Messages is translated to chat for a backend without them; "
        "for the others a backend without the API is not a candidate)")
    api_version: str = Field(default="2024-10-21", description="azure: the api-version query "
                             "parameter of every request")
    parts: PartsOverride = PartsOverride()
    tls_ca_file: str | None = Field(default=None, description="CA bundle that must have signed "
                                    "an https backend's certificate (default: envoy.ca_bundle)")
    egress_port: int | None = Field(default=None, ge=1, le=65535, description="loopback port "
                                    "of the egress listener for a backend by host name or over "
                                    "TLS (default: envoy.egress_base_port + its index)")
    health: BackendHealth = BackendHealth()
    discovery: BackendDiscovery = BackendDiscovery()
    models: list[BackendModel] = Field(default=[], description="the models it serves (with "
                                       "discovery, those it lists are added)")

    @property
    def discovers(self) -> bool:
        """Whether the service polls its model list (see ``discovery.enabled``)."""
        if self.discovery.enabled is not None:
            return self.discovery.enabled
        return self.preset in ("vllm", "sglang", "llamacpp", "ollama")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be letters, digits and ._:/@+- (no spaces)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _azure_key(cls, data: Any) -> Any:
        """Azure OpenAI takes its key in ``api-key``, bare, unless the config says otherwise."""
        if isinstance(data, dict) and data.get("preset") == "azure":
            data = {"auth_header": "api-key", "auth_scheme": "", **data}
        return data

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        return v.rstrip("/")


class Candidate(_Strict):
    """One backend model a public model may go to."""

    backend: str = Field(description="a backend's name")
    model: str = Field(description="the backend's model name (one of that backend's models)")
    tier: int | None = Field(default=None, description="candidates of one tier share the load "
                             "(in proportion to weight); lower tiers are tried first. Unset: "
                             "its position in the list, i.e. strict order")
    weight: float = Field(default=1.0, gt=0, description="share of its tier's requests")


BadAnswer = Literal["empty_answer", "no_choices", "content_filter", "invalid_tool_arguments",
                    "stream_without_content"]


class PublicModel(_Strict):
    """A name clients use, and the backend models that serve it, in order."""

    name: str = Field(description="the name clients ask for")
    aliases: list[str] = Field(default=[], description="other names for it")
    candidates: list[Candidate] = Field(min_length=1, description="tried in this order")
    owned_by: str = Field(default="llm-extproc", description="owned_by in GET /v1/models")
    fallback_on: list[BadAnswer] | None = Field(
        default=None, description="answers that move the request to the next candidate "
        "(unset: capability_routing.fallback_on)")


DEFAULT_VISION_PROMPT = (
    "Describe this image for someone who cannot see it: the main subject, any text in it "
    "(verbatim), and details relevant to the question if one is given. Be factual and concise."
)


class VisionSettings(_Strict):
    """The auxiliary vision model that describes images for models that cannot see."""

    backend: str | None = Field(default=None, description="a configured backend serving it")
    url: str | None = Field(default=None, description="or its own base URL (http://.../v1)")
    api_key_env: str | None = Field(
        default=None, description="environment variable with the aux vision model's key (with url)")
    model: str = Field(description="the aux model name, as its server expects it")
    prompt: str = Field(
        default=DEFAULT_VISION_PROMPT, description="what the aux vision model is asked about each "
        "image")
    include_user_text: bool = Field(
        default=True, description="give the aux model the user's text from the same message")
    max_tokens: int = Field(default=512, ge=16, description="longest description it may write")
    timeout_s: float = Field(default=20.0, gt=0, description="one description; then on_failure applies")
    concurrency: int = Field(default=4, ge=1, description="aux calls at once per service "
                             "process, taken in turn by the requests waiting")
    max_images_per_request: int = Field(default=16, ge=1, description="images one request "
                                        "may have described (cached ones do not count)")
    cache_size: int = Field(default=1024, ge=0, description="descriptions kept, by image digest")
    cache_ttl_s: float = Field(default=3600.0, ge=0, description="how long a cached description is reused")
    on_failure: Literal["reject", "drop"] = Field(
        default="reject", description="when describing fails: reject (an error naming the aux model), "
        "or drop (the image becomes a note saying it could not be described)")


class VirtualModel(_Strict):
    """A model name that stands for every backend model with the required capabilities."""

    name: str = Field(description="the public name (e.g. auto:vision)")
    requires: list[str] = Field(default=[], description="capabilities every member declares")
    tags: list[str] = Field(default=[], description="tags every member has")
    prefer: list[str] = Field(default=[], description="backends tried first, in this order")


class CapabilityRouting(_Strict):
    """Ordering candidates by what a request needs, and judging 200s."""

    incapable: Literal["last", "drop"] = Field(
        default="last", description="candidates known to lack a needed capability")
    hold_max_bytes: int = Field(default=4 * 1024 * 1024, ge=1024,
                                description="response bytes held while judging a forced need")
    hold_max_s: float = Field(default=60.0, gt=0, description="longest hold before releasing")
    judge_timeout_s: float = Field(
        default=1.0, gt=0, le=60, description="longest check of an answer against the client's "
        "json_schema (in a child process, killed when over); over it the answer is unjudged")
    judge_max_schema_bytes: int = Field(
        default=65536, ge=1024, description="a larger json_schema is not checked (the answer "
        "is judged as JSON only)")
    judge_workers: int = Field(default=2, ge=1, le=16,
                               description="child processes checking schemas, per service process")
    fallback_on: list[BadAnswer] = Field(
        default=[], description="answers judged bad for every model (each model may set its own "
        "fallback_on): empty_answer (no content, no tool call), no_choices, content_filter, "
        "invalid_tool_arguments (not JSON), stream_without_content (a stream that ends or "
        "errors before its first content)")


HintKind = Literal["intent", "model", "backend", "order"]


class HintNames(_Strict):
    """The name of each hint kind (a metadata key after the prefix, or a header)."""

    intent: str | None = Field(default=None, description="the intent hint's name (unset: no such hint)")
    model: str | None = Field(default=None, description="the model pin's name (unset: no such hint)")
    backend: str | None = Field(default=None, description="the backend pin's name (unset: no such hint)")
    order: str | None = Field(default=None, description="the backend order's name (unset: no such hint)")


class HintAccess(_Strict):
    """Which clients (ids from ``client_header``; "*" = anyone) may use which hints."""

    clients: list[str] = Field(default=["*"], description="client ids this rule is for (\"*\": anyone)")
    allow: list[HintKind] = Field(default=[], description="the hint kinds they may use")
    intents: list[str] | None = Field(default=None, description="allowed intents (unset: all)")


class Policy(_Strict):
    """What an intent does to the candidates, by the models' tags."""

    require_tags: list[str] = Field(default=[], description="keep only candidates with these")
    exclude_tags: list[str] = Field(default=[], description="drop candidates with these")
    prefer_tags: list[str] = Field(default=[], description="candidates with these go first")


class HintSettings(_Strict):
    """Routing hints clients send in ``metadata`` or headers, under an access policy."""

    metadata_prefix: str = Field(default="route_", description="namespace of routing keys")
    metadata_keys: HintNames = HintNames(intent="intent", model="model", backend="backend",
                                         order="order")
    headers_enabled: bool = Field(default=True, description="read hints from request headers too")
    headers: HintNames = HintNames(intent="x-route-intent", model="x-route-model",
                                   backend="x-route-backend", order="x-route-order")
    client_header: str = Field(default="x-client-id", description="who is asking (set by "
                               "Envoy's api_key_auth, or a tenant header)")
    access: list[HintAccess] = [HintAccess(clients=["*"], allow=["intent"])]
    on_denied: Literal["reject", "ignore"] = Field(
        default="reject", description="a hint the client may not use: 403, or ignored and recorded")
    on_unknown: Literal["reject", "ignore"] = Field(
        default="reject", description="an unknown intent, model, backend or routing key: 400, or "
        "ignored and recorded")
    policies: dict[str, Policy] = {}
    propagate: dict[str, str] = Field(default={}, description="backend header -> metadata key "
                                      "or request header to copy into it")
    intent_header: str | None = Field(default="x-llm-intent",
                                      description="backend header carrying the applied intent")


class ClientKey(_Strict):
    """One client's API key (checked by Envoy's api_key_auth filter)."""

    client: str = Field(description="the client's id")
    key: str | None = Field(default=None, description="its key, inline (prefer key_env)")
    key_env: str | None = Field(default=None, description="environment variable holding its key")


class ClientAuth(_Strict):
    """Client API keys, checked by Envoy's own api_key_auth filter before the service is called
    (every path, GET /v1/models included). The service and backends see only the client id (for
    hint access rules)."""

    keys: list[ClientKey] = []
    keys_file: str | None = Field(default=None, description="YAML/JSON mapping client -> key")
    header: str = Field(default="authorization", description="where clients send the key "
                        "(authorization takes `Bearer <key>`)")
    also_headers: list[str] = Field(default=["x-api-key"], description="other headers a key "
                                    "is taken from (Anthropic clients send x-api-key)")
    forward_header: str = Field(
        default="x-client-id", description="header carrying the client's id to the service and "
        "backends")


class AIGatewaySettings(_Strict):
    """Running in front of Envoy AI Gateway: it routes on a model header it derives from the
    body, so the route stage rewrites the body's model to the resolved public name and sets the
    header itself (aliases, virtual models and hints resolve before AI Gateway routes)."""

    model_header: str | None = Field(default=None, description="e.g. x-ai-eg-model")


class ServiceSettings(_Strict):
    """The gRPC ext_proc service: where it listens, its limits and processes."""

    host: str = Field(default="127.0.0.1", description="address the gRPC service listens on")
    port: int = Field(default=50051, ge=1, le=65535, description="its port (worker i of several: port + i)")
    max_message_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024 * 1024, description="largest gRPC message (bodies travel "
        "inside messages)")
    metrics_port: int = Field(default=9464, ge=0, le=65535, description="Prometheus; 0: off")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="the service's log level (JSON lines on stdout)")
    shutdown_grace_s: float = Field(
        default=10.0, ge=0, description="on SIGTERM, streams in flight get this long to finish")
    max_part_bytes: int = Field(default=24 * 1024 * 1024, ge=1024,
                                description="largest inline media part (base64 text)")
    max_decoded_audio_bytes: int = Field(
        default=24 * 1024 * 1024, ge=65536, description="audio transcoded for a backend may "
        "decode to at most this many bytes of 16-bit samples (a small compressed file can "
        "decode to gigabytes; as base64 the result must still fit envoy.max_body_bytes)")
    transcode_concurrency: int = Field(default=2, ge=1, description="audio transcodes at "
                                       "once per service process (each holds its audio)")
    workers: int = Field(default=1, ge=1, le=64, description="processes; worker i listens on "
                         "port + i and Envoy balances streams across them")
    reload_watch_s: float = Field(default=2.0, ge=0, description="poll the config file for "
                                  "changes this often (0: only on SIGHUP)")
    unix_socket: str | None = Field(
        default=None, description="also serve on this Unix socket path (worker i of several: "
        "path.i), and Envoy's rendered config reaches the service through it: cheaper per "
        "message than TCP on loopback, for Envoy on the same host or in the same pod (the path "
        "shared); the TCP port still serves `extproc health`")

    @field_validator("unix_socket")
    @classmethod
    def _socket_path(cls, v: str | None) -> str | None:
        # (a Unix socket's path is at most 107 bytes; a worker adds up to 3)
        if v is not None and not 0 < len(v.encode()) <= 104:
            raise ValueError("must be a path of 1 to 104 bytes")
        return v

    def socket_path(self, worker: int) -> str | None:
        """Where worker ``worker`` listens besides its port, if anywhere."""
        if self.unix_socket is None:
            return None
        return self.unix_socket if worker == 0 else f"{self.unix_socket}.{worker}"


class EnvoySettings(_Strict):
    """Used when rendering Envoy's config: listeners, limits, timeouts, retries."""

    listen_host: str = Field(default="127.0.0.1", description="address Envoy listens on for clients")
    listen_port: int = Field(default=10000, ge=1, le=65535, description="Envoy's port for clients")
    admin_host: str = Field(default="127.0.0.1", description="Envoy's admin interface (keep it on loopback)")
    admin_port: int = Field(default=9901, ge=1, le=65535, description="Envoy's admin port")
    service_host: str | None = Field(
        default=None, description="where Envoy reaches the service (default: service.host)"
    )
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024, ge=64 * 1024, description="buffer limit for request and response "
        "bodies (listener, clusters, retries)")
    message_timeout_ms: int = Field(
        default=10_000, ge=50, description="how long Envoy waits for the service's answer to one "
        "ext_proc message")
    max_message_timeout_ms: int = Field(
        default=120_000, ge=50, description="the longest the service may extend that wait (aux vision, "
        "fetches)")
    route_timeout_s: float = Field(default=600.0, gt=0, description="a non-streaming request, "
                                   "all attempts together (streams are bounded by stream_idle_s)")
    connect_timeout_s: float = Field(
        default=2.0, gt=0, description="connecting to a backend; then the next candidate")
    retry_base_interval_ms: int = Field(
        default=5, ge=1, description="back-off before the next candidate (fast failover)")
    retry_max_interval_ms: int = Field(
        default=50, ge=1, description="the longest back-off between candidates")
    per_try_timeout_s: float | None = Field(
        default=300.0, gt=0, description="a non-streaming attempt, then the next candidate "
        "(each backend and model may set its own attempt_timeout_s)")
    stream_idle_s: float = Field(
        default=30.0, gt=0, description="a streaming attempt that sends nothing for this long: "
        "the next candidate, or (after the client got bytes) the stream ends")
    # Envoy's circuit breakers, per backend cluster. Its defaults (1,024 requests, 3 retries
    # in flight) refuse failover under load: with a dead first candidate every request needs a
    # retry, and the fourth concurrent one got a 503 instead of the next candidate.
    max_requests: int = Field(default=10_000, ge=1, description="requests in flight per "
                              "backend cluster (and gRPC streams to the service)")
    max_pending_requests: int = Field(
        default=10_000, ge=1, description="circuit breaker: requests waiting for a connection per "
        "cluster")
    max_connections: int = Field(default=10_000, ge=1, description="circuit breaker: connections per cluster")
    retry_budget_percent: float = Field(
        default=100.0, gt=0, le=100, description="retries in flight as a share of the "
        "requests in flight: 100 lets every request fail over at once (each request has at "
        "most one attempt in flight, and at most candidates - 1 retries)")
    min_retry_concurrency: int = Field(default=64, ge=1, description="retries always allowed "
                                       "in flight, whatever the budget")
    access_log: bool = Field(
        default=True, description="JSON access log on Envoy's stdout (request id, model, backend)")
    whole_responses: bool = Field(
        default=True, description="hold each non-streaming response until it is complete, so "
        "a backend dying mid-body gives the client a JSON 502, never a truncated 200")
    token_usage: bool = Field(
        default=True, description="read each answer's token usage and each stream's time to "
        "first token in Envoy's response path (Lua) for the decision record and the GenAI "
        "metrics (measured: 30-60 us of Envoy CPU per request)")
    decision_log_flush_s: float = Field(
        default=0.25, gt=0, le=60, description="Envoy sends the service its access log "
        "entries (each request's decision record with the outcome) batched this often")
    failure_mode_allow: bool = Field(
        default=False, description="fail open: when the service is down, forward requests "
        "unprocessed (routing falls back to nothing: they fail) instead of a JSON 503")
    status_on_error: int = Field(default=503, ge=400, le=599,
                                 description="status when the service fails or is unreachable")
    request_timeout_s: float = Field(default=60.0, gt=0, description="whole request received")
    request_headers_timeout_s: float = Field(
        default=10.0, gt=0, description="a client's request headers must arrive by then")
    stream_idle_timeout_s: float = Field(
        default=300.0, gt=0, description="a client connection's stream idle this long is closed")
    egress_base_port: int = Field(default=10100, ge=1, le=65000, description="first loopback "
                                  "port for egress listeners (backends by name or over TLS)")
    ca_bundle: str = Field(
        default="/etc/ssl/certs/ca-certificates.crt", description="CA certificates for https backends "
        "and egress (PEM file)")
    direct_cluster: bool = Field(
        default=True, description="render a twin pool cluster without the attempt stage; the "
        "route stage sends requests there when no attempt would have anything to do")
    fast_lane: bool = Field(
        default=True, description="let Envoy route plain requests for a model with one "
        "candidate serving the public name (no key, /v1 paths) by itself, the body never "
        "crossing gRPC (~4.5x the req/s); `extproc check` lists which models qualify and why "
        "the others do not (docs/how-it-works.md)")
    fast_lane_max_bytes: int = Field(
        default=256 * 1024, ge=1024, description="largest request body the fast lane reads "
        "(Envoy parses it for the model); larger ones take the ext_proc path")
    fast_lane_compiled: bool | Literal["auto"] = Field(
        default="auto", description="the fast lane as an Envoy dynamic module (C, built with "
        "the system's C compiler, for Envoy 1.40 only) instead of Lua and the gRPC access log: "
        "0.76-1.01x bare Envoy's req/s instead of 0.62-0.81x here (docs/benchmark.md); Envoy "
        "must run on the service's host (records come back over a Unix socket). `auto`: "
        "compiled where `extproc up` (or `make run`) starts Envoy 1.40 and a C compiler is "
        "there, else Lua, saying why; a config rendered for your own Envoy (`extproc envoy`) "
        "is Lua unless this is true")
    fast_lane_records: str | None = Field(
        default=None, description="the Unix datagram socket the compiled lane sends its "
        "records to (worker i of several: path.i); default: llm-extproc-lane-<service "
        "port>.sock in the temporary directory")

    @field_validator("fast_lane_records")
    @classmethod
    def _records_path(cls, v: str | None) -> str | None:
        # (a Unix socket's path is at most 107 bytes; a worker adds up to 3)
        if v is not None and not 1 <= len(v.encode()) <= 100:
            raise ValueError("must be a path of 1 to 100 bytes")
        return v


class HealthSettings(_Strict):
    """Which backends are up, as the service sees it: active probes, the outcomes of requests
    (Envoy's access log), and Retry-After. A backend that is down is skipped by every request
    that has another candidate up (tried when all are down), so no request waits for its
    connect timeout; it is back in the order as soon as it is up again."""

    probes: bool = Field(default=True, description="probe backends (see each backend's health)")
    interval_s: float = Field(default=5.0, gt=0, description="how often each backend is probed")
    timeout_s: float = Field(default=2.0, gt=0, description="one probe")
    unhealthy_threshold: int = Field(default=2, ge=1, description="failed probes in a row")
    healthy_threshold: int = Field(default=1, ge=1, description="good probes in a row")
    eject_after_failures: int = Field(
        default=3, ge=1, description="attempts in a row that failed (refused, reset, timed "
        "out, 5xx) take a backend out for ejection_s")
    ejection_s: float = Field(default=10.0, gt=0, description="doubles with each ejection in "
                              "a row, up to max_ejection_s")
    max_ejection_s: float = Field(
        default=300.0, gt=0, description="the longest a failing backend is left out")
    max_retry_after_s: float = Field(default=300.0, ge=0, description="longest 429 Retry-After "
                                     "honoured (0: a 429 moves on but cools nothing)")


class Config(_Strict):
    """The whole configuration: the service, Envoy, backends, public models, policies."""

    service: ServiceSettings = ServiceSettings()
    envoy: EnvoySettings = EnvoySettings()
    fetch: FetchSettings = FetchSettings()
    vision: VisionSettings | None = None
    backends: list[Backend] = Field(min_length=1)
    models: list[PublicModel] = []
    expose_backend_models: bool = Field(
        default=True,
        description="backend models are also public under their own name (unless a public "
        "model or alias has it), with every backend serving that name as a candidate",
    )
    default_model: str | None = Field(
        default=None, description="public model used when a request carries no model"
    )
    extra_capabilities: list[str] = Field(default=[], description="capability names beyond "
                                          "tools, vision, audio, json, reasoning")
    virtual_models: list[VirtualModel] = []
    capability_routing: CapabilityRouting = CapabilityRouting()
    health: HealthSettings = HealthSettings()
    discovery: DiscoverySettings = DiscoverySettings()
    hints: HintSettings = HintSettings()
    ai_gateway: AIGatewaySettings = AIGatewaySettings()
    client_auth: ClientAuth | None = None
    routed_paths: list[str] | None = Field(
        default=None, description="the paths routed by model (unset: every endpoint the "
        "gateway knows, and their Azure-style /openai/deployments/{model}/... forms); a path "
        "it does not know is passed on as it is, routed by the body's model")
    strip_client_headers: list[str] = Field(
        default=list(DEFAULT_STRIPPED_HEADERS), description="client request headers that never "
        "reach a backend (every x-envoy-* and x-extproc-* header is removed too; credentials "
        "follow each backend's forward_client_auth)")

    @field_validator("strip_client_headers")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [h.strip().lower() for h in v]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A backend URL, split: ``host`` is an IP where the URL names localhost."""

    scheme: str
    host: str
    port: int
    base_path: str
    hostname: str = ""  # as written in the URL (TLS SNI, Host)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def needs_egress(self) -> bool:
        """Envoy's per-request endpoint order matches IP:port, and the pool speaks plain HTTP:
        a backend by host name or over TLS is reached through a loopback egress listener."""
        if self.scheme == "https":
            return True
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return True
        return False


def backend_endpoint(url: str) -> Endpoint:
    """Split a backend URL; ``localhost`` becomes 127.0.0.1 so Envoy host overrides match."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host == "localhost":
        host = "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Endpoint(parts.scheme, host, port, parts.path.rstrip("/") or "", parts.hostname or "")


def pool_addresses(cfg: Config) -> dict[str, str]:
    """Backend -> the IP:port Envoy's pool uses for it: its own, or its egress listener's."""
    out, n = {}, 0
    for b in cfg.backends:
        ep = backend_endpoint(b.url)
        if ep.needs_egress:
            out[b.name] = f"127.0.0.1:{b.egress_port or cfg.envoy.egress_base_port + n}"
            n += 1
        else:
            out[b.name] = ep.address
    return out


def _fmt_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(root)"


def _lower_first(msg: str) -> str:
    return msg[:1].lower() + msg[1:]


def _cross_check(cfg: Config) -> list[str]:
    problems: list[str] = []
    backends: dict[str, Backend] = {}
    addresses: dict[str, str] = {}
    for i, b in enumerate(cfg.backends):
        if b.name in backends:
            problems.append(f"backends[{i}].name: duplicate backend name {b.name!r}")
        backends[b.name] = b
        ep = backend_endpoint(b.url)
        if ep.address in addresses and not ep.needs_egress:
            problems.append(
                f"backends[{i}].url: {ep.address} is already backend {addresses[ep.address]!r}; "
                "list both models under one backend instead"
            )
        addresses[ep.address] = b.name
        if not b.models and not b.discovers:
            problems.append(f"backends[{i}].models: no models, and discovery is off for it")
        seen: set[str] = set()
        for j, m in enumerate(b.models):
            if m.name in seen:
                problems.append(f"backends[{i}].models[{j}].name: duplicate model {m.name!r}")
            seen.add(m.name)
    public: dict[str, str] = {}
    for i, pm in enumerate(cfg.models):
        for where, name in [(f"models[{i}].name", pm.name)] + [
            (f"models[{i}].aliases[{k}]", a) for k, a in enumerate(pm.aliases)
        ]:
            if name in public:
                problems.append(f"{where}: {name!r} is already used by {public[name]}")
            else:
                public[name] = where
        for j, c in enumerate(pm.candidates):
            b = backends.get(c.backend)
            if b is None:
                problems.append(
                    f"models[{i}].candidates[{j}].backend: unknown backend {c.backend!r} "
                    f"(known: {', '.join(backends) or 'none'})"
                )
            elif c.model not in {m.name for m in b.models} and not b.discovers:
                problems.append(
                    f"models[{i}].candidates[{j}].model: backend {c.backend!r} has no model "
                    f"{c.model!r} (it has: {', '.join(m.name for m in b.models)})"
                )
    known_caps = set(CAPABILITIES) | set(cfg.extra_capabilities)
    for i, b in enumerate(cfg.backends):
        for j, m in enumerate(b.models):
            for k, cap in enumerate(m.capabilities or ()):
                if cap not in known_caps:
                    problems.append(
                        f"backends[{i}].models[{j}].capabilities[{k}]: unknown capability "
                        f"{cap!r} (known: {', '.join(sorted(known_caps))})")
    for i, vm in enumerate(cfg.virtual_models):
        if vm.name in public:
            problems.append(f"virtual_models[{i}].name: {vm.name!r} is already used by "
                            f"{public[vm.name]}")
        public[vm.name] = f"virtual_models[{i}].name"
        for k, cap in enumerate(vm.requires):
            if cap not in known_caps:
                problems.append(f"virtual_models[{i}].requires[{k}]: unknown capability {cap!r}")
        for k, b_name in enumerate(vm.prefer):
            if b_name not in backends:
                problems.append(f"virtual_models[{i}].prefer[{k}]: unknown backend {b_name!r}")
    if cfg.client_auth is not None:
        ca = cfg.client_auth
        for i, k in enumerate(ca.keys):
            if (k.key is None) == (k.key_env is None):
                problems.append(f"client_auth.keys[{i}]: give exactly one of 'key' or 'key_env'")
        if not ca.keys and not ca.keys_file:
            problems.append("client_auth: no keys and no keys_file")
    for name in cfg.hints.policies:
        if not name:
            problems.append("hints.policies: empty intent name")
    for i, rule in enumerate(cfg.hints.access):
        for k, intent in enumerate(rule.intents or ()):
            if intent not in cfg.hints.policies:
                problems.append(f"hints.access[{i}].intents[{k}]: no policy named {intent!r}")
    for i, b in enumerate(cfg.backends):
        if b.api_key_env is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", b.api_key_env):
            problems.append(f"backends[{i}].api_key_env: not an environment variable name")
    own = {cfg.envoy.listen_port: "envoy.listen_port", cfg.envoy.admin_port: "envoy.admin_port"}
    for name, addr in pool_addresses(cfg).items():
        if addr.startswith("127.0.0.1:") and int(addr.rsplit(":", 1)[1]) in own and \
                backend_endpoint(backends[name].url).needs_egress:
            problems.append(f"backends: the egress port of {name!r} ({addr}) is "
                            f"{own[int(addr.rsplit(':', 1)[1])]}; set its egress_port")
    if cfg.default_model is not None:
        exposed = set(public)
        if cfg.expose_backend_models:
            exposed |= {m.name for b in cfg.backends for m in b.models}
        if cfg.default_model not in exposed:
            problems.append(f"default_model: {cfg.default_model!r} is not a public model or alias")
    if cfg.vision is not None:
        v = cfg.vision
        if (v.backend is None) == (v.url is None):
            problems.append("vision: give exactly one of 'backend' (a configured backend) or 'url'")
        elif v.backend is not None:
            b = backends.get(v.backend)
            if b is None:
                problems.append(f"vision.backend: unknown backend {v.backend!r}")
            elif v.model not in {m.name for m in b.models} and not b.discovers:
                problems.append(f"vision.model: backend {v.backend!r} has no model {v.model!r}")
        elif v.url is not None and urlsplit(v.url).scheme not in ("http", "https"):
            problems.append("vision.url: must be an http:// or https:// URL")
    # Envoy ignores a per-try limit that is not below the route's (the whole request's).
    limits = [("envoy.per_try_timeout_s", cfg.envoy.per_try_timeout_s)] + [
        (f"backends[{i}].attempt_timeout_s", b.attempt_timeout_s)
        for i, b in enumerate(cfg.backends)] + [
        (f"backends[{i}].models[{j}].attempt_timeout_s", m.attempt_timeout_s)
        for i, b in enumerate(cfg.backends) for j, m in enumerate(b.models)]
    for where, value in limits:
        if value is not None and value >= cfg.envoy.route_timeout_s:
            problems.append(f"{where}: {value} is not below envoy.route_timeout_s "
                            f"({cfg.envoy.route_timeout_s}): Envoy would ignore it")
    headroom = 256 * 1024
    if cfg.service.max_message_bytes < cfg.envoy.max_body_bytes + headroom:
        problems.append(f"service.max_message_bytes: {cfg.service.max_message_bytes} is below "
                        f"envoy.max_body_bytes + {headroom} (bodies travel to the service in "
                        "one gRPC message: larger ones would fail there)")
    for k, p in enumerate(cfg.routed_paths or ()):
        if not p.startswith("/"):
            problems.append(f"routed_paths[{k}]: must start with '/'")
    return problems


def parse_config(data: Any) -> Config:
    """Validate a config mapping; raise ConfigError listing every problem with its key path."""
    if not isinstance(data, dict):
        raise ConfigError(["(root): the config must be a mapping"])
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(
            [f"{_fmt_loc(e['loc'])}: {_lower_first(e['msg'])}" for e in exc.errors()]
        ) from None
    problems = _cross_check(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | os.PathLike[str]) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"(file): cannot read {path}: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"(file): not valid YAML: {exc}"]) from None
    return parse_config(data)
