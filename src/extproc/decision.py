"""The routing decision record: one JSON line per request saying where it went and why."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .routing import RouteDecision


@dataclass(slots=True)
class DecisionRecord:
    request_id: str
    method: str = ""
    path: str = ""
    started: float = field(default_factory=time.monotonic)
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
            "duration_ms": round((time.monotonic() - self.started) * 1000, 3),
        }
