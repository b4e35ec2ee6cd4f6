"""The routing decision record: one JSON line per request saying where it went and why.

The route stage fills in the decision and hands it to Envoy as dynamic metadata (one JSON
string); Envoy's gRPC access log brings it back with the outcome once the response is done
(status, attempts, timings, what the attempt stage reported in its response headers), and
``complete`` turns both into the logged record. Stateless: any worker or replica may finish a
record any other one started, and no per-request message is spent on the outcome.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..contract import (
    RESP_BACKEND,
    RESP_CONVERTED,
    RESP_MODEL,
    RESP_TRANSLATED,
    RESP_UNMET,
    RESP_VISION,
    Meta,
)
from .routing import RouteDecision, Target


@dataclass(slots=True)
class DecisionRecord:
    """What the route stage decided; field names are the logged ones."""

    request_id: str
    method: str = ""
    path: str = ""
    model_requested: str | None = None
    public_model: str | None = None
    resolution: str | None = None
    candidates: tuple[Target, ...] = ()  # orjson writes each as {backend, model, address}
    # How the attempts are handled: "direct" (prepared whole by the route stage), "judged"
    # (prepared whole; the attempt stage sees responses only), "per_attempt" (adapted each).
    plan: str | None = None
    api: str = "chat"  # the API the client called (endpoints.Api)
    # Candidates spoken to in another API than the client's (it was translated for them).
    translated: list[str] = field(default_factory=list)
    # Capabilities backends reported for the candidates (not declared in the config).
    detected_capabilities: dict[str, list[str]] = field(default_factory=dict)
    # The request's estimated tokens, and the candidates too small for it (ordered last).
    context: dict[str, Any] = field(default_factory=dict)
    outcome: str = "incomplete"
    status: int | None = None
    error_code: str | None = None
    warnings: list[str] = field(default_factory=list)
    dropped_candidates: list[dict[str, str]] = field(default_factory=list)
    hints: dict[str, Any] = field(default_factory=dict)
    context: dict[str, str] = field(default_factory=dict)
    needs: dict[str, Any] = field(default_factory=dict)
    # Candidates whose backend was down: state, since (wall clock), reason, whether skipped.
    unavailable: list[dict[str, Any]] = field(default_factory=list)
    decided_by: int = 0  # the pid of the worker whose route stage decided

    def reason(self) -> str:
        """One line for access logs: how the model resolved and what steered it."""
        out = f"{self.resolution}:{self.model_requested}->{self.public_model}"
        if self.hints.get("policy"):
            out += f"; intent={self.hints['policy']}"
        applied = [k for k in self.hints.get("applied", ()) if k != "intent"]
        if applied:
            out += "; hints=" + ",".join(applied)
        if self.needs.get("needed"):
            out += "; needs=" + ",".join(self.needs["needed"])
        if self.dropped_candidates:
            out += f"; dropped={len(self.dropped_candidates)}"
        if self.unavailable:
            out += f"; down={','.join(u['backend'] for u in self.unavailable)}"
        return out

    def routed(self, d: RouteDecision) -> None:
        self.model_requested = d.requested
        self.public_model = d.public_model
        self.resolution = d.resolution
        self.candidates = d.candidates
        self.warnings = d.warnings
        self.hints = d.hints.record() if d.hints.values else {}
        self.context = dict(d.hints.context)
        if d.needs.needed or d.needs.bad:
            self.needs = {"needed": sorted(d.needs.needed), "forced": sorted(d.needs.forced),
                          **({"fallback_on": sorted(d.needs.bad)} if d.needs.bad else {})}
        self.dropped_candidates = [
            {"backend": t.backend, "model": t.model, "reason": f"cannot take {why}"}
            for t, why in d.dropped]
        self.unavailable = d.unavailable
        self.translated = [f"{t.backend}/{t.model}" for t in d.candidates if t in d.translated]
        self.detected_capabilities = d.detected
        self.context = d.context

    def rejected(self, status: int, code: str | None) -> None:
        self.status = status
        self.error_code = code
        self.outcome = "rejected"

    def to_json(self) -> str:
        """What travels in Envoy's dynamic metadata until the outcome is known."""
        return orjson.dumps(self).decode()


def _count(value: str) -> int | None:
    """A noted figure (a backend may claim anything: 16 digits at most)."""
    return int(value) if value.isdigit() and len(value) <= 16 else None


def usage(figures: Mapping[str, str], start_us: int | None = None) -> dict[str, Any]:
    """Token usage and stream latency from what Envoy's response-side Lua noted (``Meta``
    usage and timestamp keys, as strings) and when Envoy had the request (``start_us``, wall
    clock): input and output tokens, the time to the first token and per output token after
    it (streams), in milliseconds."""
    out: dict[str, Any] = {}
    tokens_in = _count(figures.get(Meta.USAGE_IN, ""))
    tokens_out = _count(figures.get(Meta.USAGE_OUT, ""))
    if tokens_in is not None:
        out["input_tokens"] = tokens_in
    if tokens_out is not None:
        out["output_tokens"] = tokens_out
    first = _count(figures.get(Meta.FIRST_TOKEN_US, ""))
    last = _count(figures.get(Meta.LAST_US, ""))
    if start_us is not None and first is not None and first >= start_us:
        out["ttft_ms"] = (first - start_us) / 1000
        if last is not None and tokens_out is not None and tokens_out > 1 and last >= first:
            out["tpot_ms"] = (last - first) / 1000 / (tokens_out - 1)
    return out


def complete(record: dict[str, Any], status: int, headers: Mapping[str, str],
             attempt_count: int | None, timings_ms: dict[str, float],
             retries: list[dict[str, Any]]) -> dict[str, Any]:
    """The logged record: the route stage's decision (``to_json`` decoded; left unchanged)
    plus the outcome Envoy logged (status, attempt count, timings) and what the attempt stage,
    or for requests that skip it Envoy's route, said in the response headers. Attempts are
    filled in order: Envoy walked the candidates in order."""
    rec: dict[str, Any] = {"event": "routing.decision", **record,
                           "attempts": [], "converted_parts": 0, "vision": None,
                           "unmet_capability": None, "capability_retries": retries,
                           "timings_ms": timings_ms}
    if rec.get("outcome") != "incomplete":  # answered by the route stage itself
        return rec
    backend = headers.get(RESP_BACKEND) or None
    model = headers.get(RESP_MODEL) or None
    rec["status"] = status
    n = attempt_count or (1 if backend else 0)
    candidates = rec.get("candidates") or []
    attempts = []
    for i in range(n):
        entry: dict[str, Any] = {"n": i + 1, **(candidates[i] if i < len(candidates) else {})}
        if i == n - 1:
            if backend:
                entry.update(backend=backend, model=model)
            if headers.get(RESP_TRANSLATED):
                entry["translated"] = headers[RESP_TRANSLATED]
            entry["status"] = status
        else:
            entry["result"] = "failed, retried"
        attempts.append(entry)
    rec["attempts"] = attempts
    # (no backend named and a success: inside Envoy AI Gateway, which does not tag answers)
    rec["outcome"] = "ok" if status < 400 else \
        "upstream_failed" if backend is None else "backend_error"
    converted = headers.get(RESP_CONVERTED, "")
    if converted.isdigit():
        rec["converted_parts"] = int(converted)
    rec["vision"] = headers.get(RESP_VISION) or None
    rec["unmet_capability"] = headers.get(RESP_UNMET) or None
    return rec
