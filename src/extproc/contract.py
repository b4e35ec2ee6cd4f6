"""The contract between llm-extproc and Envoy: every name both sides must agree on, in one place.

The route stage answers once per client request; what the attempt stage needs for each attempt
(retries included) travels in the request's dynamic metadata and comes back as ext_proc
request attributes. That hand-off is one typed object, ``HandOff``, with one encode/decode
pair. The renderer (``render/``) builds Envoy's config from the same names, so a key renamed
here is renamed everywhere. Pure data: no protobuf, no I/O (``shell/protocol.py`` builds the
messages).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Any

import orjson

from .core.capabilities import Needs
from .core.endpoints import BY_PATH, OTHER, Endpoint
from .core.parts import Sig
from .core.routing import Target

STAGE_KEY = "x-extproc-stage"  # gRPC initial metadata: which stage a stream serves


class Stage(StrEnum):
    ROUTE = "route"      # an HCM filter before the router: once per client request
    ATTEMPT = "attempt"  # an upstream filter in the backend clusters: once per attempt


class Cluster(StrEnum):
    """The backend clusters: the same endpoints and per-request order, three filter chains."""

    POOL = "llm_backends"            # the attempt stage on both sides of every attempt
    DIRECT = "llm_backends_direct"   # prepared whole by the route stage: no attempt stage
    JUDGED = "llm_backends_judged"   # prepared whole: the attempt stage sees responses only
    FAST = "llm_backends_fast"       # the compiled fast lane's: it tags answers itself


SERVICE_CLUSTER = "extproc_service"
META_NS = "extproc"  # our dynamic metadata namespace
DECISION_LOG_NAME = "llm_extproc_decisions"  # Envoy's gRPC access log back to the service
HEALTH_PATH = "/extproc/health"  # GET: each backend's health, answered by the route stage


class Meta(StrEnum):
    """Keys of our dynamic metadata, set by the route stage."""

    # Read by Envoy: the override-host LB's endpoint order; access log; local replies.
    HOSTS = "hosts"
    PUBLIC_MODEL = "public_model"
    ROUTE_REASON = "route_reason"
    INTENT = "intent"
    RECORD = "record"          # the decision record, back to the service with the outcome
    # Response headers Envoy's route adds where the attempt stage did not set them.
    BACKEND = "backend"
    MODEL = "model"
    WARNINGS = "warnings"
    CONVERTED = "converted"
    VISION = "vision"
    # The hand-off to the attempt stage.
    CANDIDATES = "candidates"
    BODY_MODEL = "body_model"
    PARTS = "parts"
    NEEDS = "needs"
    UNSTORED_METADATA = "unstored_metadata"
    PATH = "path"
    CLIENT_AUTH = "client_auth"
    ENDPOINT = "endpoint"
    ECHO = "echo"  # translated by the route stage: what of the request the answer repeats
    # Set by the response-side Lua filter (render/filters.py): the answer's token usage and,
    # for streams, when its first token came and when it ended (wall clock, microseconds).
    USAGE_ADDED = "usage_added"  # the route stage asked for a stream's usage chunk
    USAGE_IN = "usage_in"
    USAGE_OUT = "usage_out"
    FIRST_TOKEN_US = "first_token_us"
    LAST_US = "last_us"
    # Set by the fast lane's Lua (render/fast_lane.py) instead of a record: the request went
    # to the backend without the route stage; the value is its route's silence limit (ms).
    FAST = "fast"
    REQUESTED = "requested"  # ...and for an alias, the name the client asked for


def attribute(key: Meta) -> str:
    """The ext_proc request attribute that brings a metadata key back to the attempt stage."""
    return f"metadata.filter_metadata['{META_NS}']['{key}']"


def formatted(key: Meta) -> str:
    """Envoy's formatter for a metadata key (access logs, added headers, local replies)."""
    return f"%DYNAMIC_METADATA({META_NS}:{key})%"


# Request headers the route stage sets (the first two never leave Envoy).
CLUSTER_HEADER = "x-extproc-cluster"       # the route's cluster_header
STREAM_HEADER = "x-extproc-stream"         # a streaming request's silence limit (ms): its route
RETRY_HEADER = "x-extproc-retry"           # added to a bad answer: Envoy retries the next
MAX_RETRIES_HEADER = "x-envoy-max-retries"
PER_TRY_HEADER = "x-envoy-upstream-rq-per-try-timeout-ms"

# Response headers that say what happened.
RESP_BACKEND = "x-extproc-backend"
RESP_MODEL = "x-extproc-model"
RESP_ATTEMPTS = "x-extproc-attempts"
RESP_CONVERTED = "x-extproc-converted-parts"
RESP_WARNINGS = "x-extproc-warnings"
RESP_VISION = "x-extproc-vision"
RESP_UNMET = "x-extproc-unmet-capability"
RESP_TRANSLATED = "x-extproc-translated"     # e.g. messages<-chat: spoken to in another API
# A body adapted by the route stage: the metadata key Envoy's route sets each header from.
TAG_META = {RESP_CONVERTED: Meta.CONVERTED, RESP_VISION: Meta.VISION}
# What the decision log reads from each response (Envoy logs these for it).
DECISION_HEADERS = (RESP_BACKEND, RESP_MODEL, RESP_CONVERTED, RESP_VISION, RESP_UNMET,
                    RESP_TRANSLATED)
# Ours alone: a backend's copies are dropped before we tag a response.
OWN_RESPONSE_HEADERS = (*DECISION_HEADERS, RESP_WARNINGS, RESP_ATTEMPTS, RETRY_HEADER)

# What the attempt stage is sent with each attempt's request headers (the judged cluster's,
# which sees responses only, with the response headers).
ATTR_ADDRESS = "upstream.address"
ATTR_ATTEMPT = "upstream.request_attempt_count"
ATTR_REQUEST_ID = "request.headers['x-request-id']"
HANDOFF_KEYS = (Meta.CANDIDATES, Meta.BODY_MODEL, Meta.PARTS, Meta.NEEDS, Meta.UNSTORED_METADATA,
                Meta.PATH, Meta.CLIENT_AUTH, Meta.ENDPOINT)
ATTEMPT_ATTRIBUTES = (ATTR_ADDRESS, ATTR_ATTEMPT, *(attribute(k) for k in HANDOFF_KEYS))
JUDGED_ATTRIBUTES = (ATTR_ADDRESS, ATTR_ATTEMPT, attribute(Meta.CANDIDATES),
                     attribute(Meta.NEEDS), attribute(Meta.ENDPOINT), attribute(Meta.ECHO),
                     ATTR_REQUEST_ID)


_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def header_safe(value: str) -> str:
    """A header value that cannot end the header: control characters become %XX. Every value
    we set goes through here, whatever its source (validation upstream is the first line; a
    value that slipped through must still not inject a header or make Envoy refuse the
    mutation)."""
    if _UNSAFE.search(value) is None:
        return value
    return _UNSAFE.sub(lambda m: f"%{ord(m.group()):02X}", value)



@dataclass(frozen=True, slots=True)
class HandOff:
    """What every attempt needs of the route stage's decision. Fields the route stage did not
    set keep their defaults (a request prepared whole hands off candidates and needs only)."""

    candidates: tuple[Target, ...]
    body_model: str | None = None      # what the body's model says now (each attempt rewrites)
    sigs: tuple[Sig, ...] = ()         # the body's part signatures: whether to reshape
    needs: Needs | None = None         # judged answers: forced capabilities, fallback rules
    unstored_metadata: bool = False    # `metadata` without `store: true` (OpenAI refuses it)
    path: str | None = None            # the client's path, when some backend's path differs
    client_auth: dict[str, str] = field(default_factory=dict)  # to backends that forward it
    endpoint: Endpoint = BY_PATH["/v1/chat/completions"]  # what the client called
    # Translated whole by the route stage: what of the client's request its answer repeats
    # (the attempt stage translates the answer back without the request body).
    echo: dict[str, Any] | None = None

    def encode(self) -> dict[str, str]:
        out = {Meta.CANDIDATES.value: encode_candidates(self.candidates)}
        if self.body_model is not None:
            out[Meta.BODY_MODEL] = orjson.dumps(self.body_model).decode()
        if self.sigs:
            out[Meta.PARTS] = orjson.dumps([s.encode() for s in self.sigs]).decode()
        if self.needs is not None:
            out[Meta.NEEDS] = self.needs.encode()
        if self.unstored_metadata:
            out[Meta.UNSTORED_METADATA] = "1"
        if self.path is not None:
            out[Meta.PATH] = self.path
        if self.client_auth:
            out[Meta.CLIENT_AUTH] = orjson.dumps(self.client_auth).decode()
        if self.endpoint.path != "/v1/chat/completions":
            out[Meta.ENDPOINT] = self.endpoint.path or "-"
        if self.echo is not None:
            out[Meta.ECHO] = orjson.dumps(self.echo).decode()
        return out

    @classmethod
    def decode(cls, attrs: Mapping[str, object]) -> HandOff | None:
        """From the attempt stage's attributes; None when there is none (the route stage did
        not run); raises ValueError when it is malformed."""

        def get(key: Meta) -> str | None:
            value = attrs.get(attribute(key))
            return value if isinstance(value, str) and value else None

        raw = get(Meta.CANDIDATES)
        if raw is None:
            return None
        model, parts, needs = get(Meta.BODY_MODEL), get(Meta.PARTS), get(Meta.NEEDS)
        auth, echo = get(Meta.CLIENT_AUTH), get(Meta.ECHO)
        return cls(
            decode_candidates(raw),
            orjson.loads(model) if model else None,
            tuple(Sig.decode(x) for x in orjson.loads(parts)) if parts else (),
            Needs.decode(needs) if needs else None,
            get(Meta.UNSTORED_METADATA) is not None,
            get(Meta.PATH),
            {str(k): str(v) for k, v in orjson.loads(auth).items()} if auth else {},
            BY_PATH.get(get(Meta.ENDPOINT) or "/v1/chat/completions", OTHER),
            orjson.loads(echo) if echo else None,
        )


@lru_cache(maxsize=4096)
def encode_candidates(cands: tuple[Target, ...]) -> str:
    """(Candidate lists repeat request after request: each is encoded once.)"""
    return orjson.dumps([[t.backend, t.model, t.address] for t in cands]).decode()


def decode_candidates(meta: str) -> tuple[Target, ...]:
    """Inverse of encode_candidates; raises ValueError on anything malformed."""
    try:
        raw = orjson.loads(meta)
        return tuple(Target(str(b), str(m), str(a)) for b, m, a in raw)
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"bad candidate metadata: {exc}") from None
