"""Prometheus metrics on their own port. Names follow Prometheus conventions; labels use the
OpenTelemetry GenAI attribute names where one exists (``gen_ai_request_model``,
``gen_ai_response_model``)."""

from __future__ import annotations

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
STAGE_SECONDS = Histogram(
    "llm_extproc_processing_seconds", "Time the service spent on one ext_proc message",
    ["stage", "phase"], registry=REGISTRY,
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
             1.0, 2.5, 5.0, 10.0, 30.0))


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
