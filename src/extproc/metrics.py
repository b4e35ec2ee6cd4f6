"""Prometheus metrics on their own port. Names follow Prometheus conventions; labels use the
OpenTelemetry GenAI attribute names where one exists (``gen_ai_request_model``,
``gen_ai_response_model``)."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

REGISTRY = CollectorRegistry()

REQUESTS = Counter(
    "llm_extproc_requests", "Client requests by public model, final backend and outcome",
    ["gen_ai_request_model", "backend", "gen_ai_response_model", "outcome"], registry=REGISTRY)
ATTEMPT_RETRIES = Counter(
    "llm_extproc_capability_retries", "Attempts judged to lack a forced capability",
    ["capability", "backend", "retried"], registry=REGISTRY)
PART_CONVERSIONS = Counter(
    "llm_extproc_part_conversions", "Content parts converted for a backend",
    ["backend"], registry=REGISTRY)
VISION = Counter(
    "llm_extproc_vision_substitutions", "Images replaced by an aux vision description",
    ["aux_model", "result"], registry=REGISTRY)
HINTS = Counter(
    "llm_extproc_hints", "Routing hints seen, by kind and what became of them",
    ["kind", "result"], registry=REGISTRY)
LANE_RECORDS_LOST = Counter(
    "llm_extproc_lane_records_lost", "Compiled fast lane records not received (unsent or "
    "unreadable): requests missing from the other metrics and the decision log",
    registry=REGISTRY)
STAGE_SECONDS = Histogram(
    "llm_extproc_processing_seconds", "Time the service spent on one ext_proc message",
    ["stage", "phase"], registry=REGISTRY,
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
             1.0, 2.5, 5.0, 10.0, 30.0))


# OpenTelemetry GenAI metrics (gen_ai.client.token.usage, gen_ai.server.time_to_first_token,
# gen_ai.server.time_per_output_token), in Prometheus form, from what Envoy saw of each answer.
_GENAI_LABELS = ["gen_ai_request_model", "gen_ai_response_model", "backend", "client"]
TOKENS = Histogram(
    "gen_ai_client_token_usage", "Tokens per request, by type (input, output)",
    ["gen_ai_token_type", *_GENAI_LABELS], registry=REGISTRY,
    buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304))
TTFT = Histogram(
    "gen_ai_server_time_to_first_token", "Seconds from the request to a stream's first token",
    _GENAI_LABELS, registry=REGISTRY,
    buckets=(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
             7.5, 10.0))
TPOT = Histogram(
    "gen_ai_server_time_per_output_token", "Seconds per output token after the first (streams)",
    _GENAI_LABELS, registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5))


_USAGE_CHILDREN: dict[tuple[str, ...], tuple[Histogram, Histogram, Histogram, Histogram]] = {}


def _usage_children(labels: tuple[str, str, str, str]
                    ) -> tuple[Histogram, Histogram, Histogram, Histogram]:
    children = _USAGE_CHILDREN.get(labels)
    if children is None:
        children = _USAGE_CHILDREN[labels] = (
            TOKENS.labels("input", *labels), TOKENS.labels("output", *labels),
            TTFT.labels(*labels), TPOT.labels(*labels))
    return children


# ``core.decision.usage``'s figures, in the order of ``_usage_children``, and their scale.
_FIGURES = (("input_tokens", 1), ("output_tokens", 1), ("ttft_ms", 1000), ("tpot_ms", 1000))


def usage(figures: dict[str, float], public_model: str, model: str, backend: str,
          client: str) -> None:
    """One answer's token usage and stream latency (``core.decision.usage``'s figures); the
    labelled children cached as in ``requests``."""
    children = _usage_children((public_model, model, backend, client))
    for child, (key, scale) in zip(children, _FIGURES, strict=True):
        if key in figures:
            child.observe(figures[key] / scale)


def usages(many: list[dict[str, float]], public_model: str, model: str, backend: str,
           client: str) -> None:
    """``usage`` for many answers with the same labels (the compiled lane's batches)."""
    children = _usage_children((public_model, model, backend, client))
    for child, (key, scale) in zip(children, _FIGURES, strict=True):
        amounts = [f[key] / scale for f in many if key in f]
        if amounts:
            observe_all(child, amounts)


def observe_all(child: Histogram, amounts: list[float]) -> None:
    """``observe`` for many amounts at once, each bucket counted once. prometheus_client has
    no such call: this does what its ``observe`` does with the same values
    (tests/unit/test_lane_records.py checks the exposition is the same)."""
    bounds = child._upper_bounds
    child._sum.inc(sum(amounts))
    for i, n in Tally(bisect_left(bounds, a) for a in amounts).items():
        child._buckets[i].inc(n)


_STAGE_CHILDREN: dict[tuple[str, str], Histogram] = {}


def stage_seconds(stage: str, phase: str) -> Histogram:
    """The labelled child, looked up once (``labels()`` costs a lock and a tuple each call)."""
    child = _STAGE_CHILDREN.get((stage, phase))
    if child is None:
        child = _STAGE_CHILDREN[(stage, phase)] = STAGE_SECONDS.labels(stage, phase)
    return child


_REQUEST_CHILDREN: dict[tuple[str, str, str, str], Counter] = {}


def requests(public_model: str, backend: str, model: str, outcome: str) -> Counter:
    """The labelled child, cached (``labels()`` costs a lock and a tuple each call): as many
    entries as the metric has children."""
    key = (public_model, backend, model, outcome)
    child = _REQUEST_CHILDREN.get(key)
    if child is None:
        child = _REQUEST_CHILDREN[key] = REQUESTS.labels(*key)
    return child


def start(port: int, host: str = "127.0.0.1") -> None:
    if port:
        start_http_server(port, addr=host, registry=REGISTRY)


def start_multiprocess(port: int, host: str) -> None:
    """The supervisor of several workers serves their metrics summed (PROMETHEUS_MULTIPROC_DIR
    was set before any worker imported prometheus_client)."""
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(port, addr=host, registry=registry)
