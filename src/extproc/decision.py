"""The routing decision record: one JSON line per request saying where it went and why.

The route stage fills in the decision and hands it to Envoy as dynamic metadata (one JSON
string); Envoy's gRPC access log brings it back with the outcome once the response is done
(status, attempts, timings, what the attempt stage reported in its response headers), and
``complete`` turns both into the logged record. Stateless: any worker or replica may finish a
record any other one started, and no per-request message is spent on the outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import orjson

from .messages import RESP_BACKEND, RESP_CONVERTED, RESP_MODEL, RESP_UNMET, RESP_VISION
from .routing import RouteDecision


@dataclass(slots=True)
class DecisionRecord:
    request_id: str
    method: str = ""
    path: str = ""
    model_requested: str | None = None
    public_model: str | None = None
    resolution: str | None = None
    candidates: list[dict[str, str]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    outcome: str = "incomplete"
    status: int | None = None
    error_code: str | None = None
    warnings: list[str] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)
    converted_parts: int = 0
    vision: str | None = None
    unmet: str | None = None
    retries: list[dict[str, Any]] = field(default_factory=list)

    hints: dict[str, Any] = field(default_factory=dict)
    context: dict[str, str] = field(default_factory=dict)
    needs: dict[str, Any] = field(default_factory=dict)
    decided_by: int = 0  # the pid of the worker whose route stage decided
    timings_ms: dict[str, float] = field(default_factory=dict)

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
        if self.dropped:
            out += f"; dropped={len(self.dropped)}"
        return out

    def routed(self, d: RouteDecision) -> None:
        self.model_requested = d.requested
        self.public_model = d.public_model
        self.resolution = d.resolution
        self.candidates = [
            {"backend": t.backend, "model": t.model, "address": t.address} for t in d.candidates
        ]
        self.warnings = d.warnings
        self.hints = d.hints.record() if d.hints.values else {}
        self.context = dict(d.hints.context)
        if d.needs.needed:
            self.needs = {"needed": sorted(d.needs.needed), "forced": sorted(d.needs.forced)}
        self.dropped = [{"backend": t.backend, "model": t.model, "reason": f"cannot take {why}"}
                        for t, why in d.dropped]

    def answered(self, status: int, backend: str | None, model: str | None,
                 attempt_count: int | None) -> None:
        """Fill attempts from the final response: Envoy walked the candidates in order."""
        self.status = status
        n = attempt_count or (1 if backend else 0)
        self.attempts = []
        for i in range(n):
            cand = self.candidates[i] if i < len(self.candidates) else {}
            entry: dict[str, Any] = {"n": i + 1, **cand}
            if i == n - 1:
                if backend:
                    entry.update(backend=backend, model=model)
                entry["status"] = status
            else:
                entry["result"] = "failed, retried"
            self.attempts.append(entry)
        if backend is None:
            self.outcome = "upstream_failed"
        else:
            self.outcome = "ok" if status < 400 else "backend_error"

    def rejected(self, status: int, code: str | None) -> None:
        self.status = status
        self.error_code = code
        self.outcome = "rejected"

    def to_json(self) -> str:
        """What travels in Envoy's dynamic metadata until the outcome is known."""
        return orjson.dumps(self).decode()

    @classmethod
    def from_json(cls, text: str) -> DecisionRecord:
        data = orjson.loads(text)
        return cls(**{k: v for k, v in data.items() if k in _FIELDS})

    def complete(self, status: int, headers: dict[str, str], attempts: int | None,
                 timings_ms: dict[str, float]) -> None:
        """Add the outcome Envoy logged: its status and attempt count, and what the attempt
        stage (or, for requests that skip it, Envoy's route) said in the response headers."""
        self.timings_ms = timings_ms
        if self.outcome != "incomplete":  # answered by the route stage itself
            return
        backend = headers.get(RESP_BACKEND) or None
        self.answered(status, backend, headers.get(RESP_MODEL) or None, attempts)
        converted = headers.get(RESP_CONVERTED, "")
        if converted.isdigit():
            self.converted_parts = int(converted)
        self.vision = headers.get(RESP_VISION) or None
        self.unmet = headers.get(RESP_UNMET) or None

    def as_log(self) -> dict[str, Any]:
        return {
            "event": "routing.decision",
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "model_requested": self.model_requested,
            "public_model": self.public_model,
            "resolution": self.resolution,
            "candidates": self.candidates,
            "attempts": self.attempts,
            "outcome": self.outcome,
            "status": self.status,
            "error_code": self.error_code,
            "dropped_candidates": self.dropped,
            "converted_parts": self.converted_parts,
            "vision": self.vision,
            "capability_retries": self.retries,
            "unmet_capability": self.unmet,
            "warnings": self.warnings,
            "hints": self.hints,
            "context": self.context,
            "needs": self.needs,
            "decided_by": self.decided_by,
            "timings_ms": self.timings_ms,
        }


_FIELDS = frozenset(f.name for f in fields(DecisionRecord))
