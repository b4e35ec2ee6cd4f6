"""Which backends are up, as the service sees them, and what that does to a request's order.

Envoy cannot do this part for us: its override-host load balancer looks each listed address up
without looking at its health, and one cluster's active health check uses one path for every
host (vLLM answers ``/health``, Ollama ``/api/version``). So the service keeps the view, from
three sources, and skips backends that are down in each request's candidate list while another
candidate is up (all are tried when all are down), so no request waits for their connect
timeout:

- probes (``service.py`` runs them): ``unhealthy_threshold`` failures in a row make a backend
  unhealthy, ``healthy_threshold`` successes bring it back;
- request outcomes (the decision log, from Envoy's access log): ``eject_after_failures``
  failed attempts in a row (refused, reset, timed out, 5xx) eject it for ``ejection_s``,
  doubled for each ejection in a row up to ``max_ejection_s`` (passive outlier detection,
  which also covers backends nobody probes);
- a 429 with ``Retry-After``: the backend cools down that long.

Pure: every event comes with its times (monotonic for deadlines, wall clock for "since").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import Config, HealthSettings

# What a preset's server answers a health probe on (its host, not its API base path).
PROBE_PATHS = {"vllm": "/health", "sglang": "/health", "llamacpp": "/health",
               "ollama": "/api/version", "openai": None}


@dataclass(slots=True)
class BackendHealth:
    """One backend's state. ``down`` (probes) and ``until`` (ejected or cooling) are separate:
    a probe cannot cut an ejection short, and an ejection ending does not undo probes."""

    probe_down: bool = False
    probe_since: float = 0.0
    probe_reason: str = ""
    probe_failures: int = 0
    probe_successes: int = 0
    failures: int = 0              # failed attempts in a row
    ejections: int = 0             # ejections in a row (the next one lasts longer)
    until: float = 0.0             # monotonic: ejected or cooling until then
    until_state: str = ""          # "ejected" | "cooling"
    until_since: float = 0.0
    until_reason: str = ""


def probe_path(cfg: Config, backend: str) -> str | None:
    """The path probed on a backend, or None when it is not probed."""
    b = next(x for x in cfg.backends if x.name == backend)
    if not cfg.health.probes or b.health.probe is False:
        return None
    path = b.health.path or PROBE_PATHS.get(b.preset)
    if path is None and b.health.probe:
        path = "/health"
    return path


class Health:
    """Every backend's state; ``available`` is what the route stage asks per candidate."""

    def __init__(self, settings: HealthSettings, backends: list[str]):
        self.settings = settings
        self.backends = {name: BackendHealth() for name in backends}
        # Backends held down (probes) plus backends held out (ejected, cooling): 0 lets a
        # request skip looking at its candidates one by one.
        self.down = 0

    def reconfigure(self, settings: HealthSettings, backends: list[str]) -> None:
        """A new config: keep what is known of backends that remain."""
        self.settings = settings
        self.backends = {n: self.backends.get(n) or BackendHealth() for n in backends}
        self.down = sum(h.probe_down + bool(h.until) for h in self.backends.values())

    # ------------------------------------------------------------ events

    # Each event returns the state it moved the backend to ("unhealthy", "healthy",
    # "ejected", "cooling"), or None: the caller logs transitions.

    def probed(self, backend: str, ok: bool, why: str, mono: float, wall: float) -> str | None:
        h = self.backends.get(backend)
        if h is None:
            return None
        s = self.settings
        if ok:
            h.probe_failures, h.probe_successes = 0, h.probe_successes + 1
            if h.probe_down and h.probe_successes >= s.healthy_threshold:
                h.probe_down, h.probe_reason = False, ""
                self.down -= 1
                return "healthy"
            return None
        h.probe_successes, h.probe_failures = 0, h.probe_failures + 1
        h.probe_reason = why
        if not h.probe_down and h.probe_failures >= s.unhealthy_threshold:
            h.probe_down, h.probe_since = True, wall
            self.down += 1
            return "unhealthy"
        return None

    def attempt(self, backend: str, ok: bool, why: str, mono: float, wall: float
                ) -> str | None:
        """One attempt's outcome: ``ok`` is any answer but a 5xx (a 4xx is the request's
        fault, not the backend's); a failure is a refusal, reset, timeout or 5xx."""
        h = self.backends.get(backend)
        if h is None:
            return None
        s = self.settings
        if ok:
            self.answered(backend)
            return None
        h.failures += 1
        if h.failures < s.eject_after_failures or self._held(h, mono):
            return None
        span = min(s.ejection_s * 2 ** h.ejections, s.max_ejection_s)
        h.ejections, h.failures = h.ejections + 1, 0
        self._hold(h, mono + span, "ejected", wall,
                   f"{s.eject_after_failures} failed attempts in a row (last: {why}); "
                   f"out for {span:.0f}s")
        return "ejected"

    def answered(self, backend: str, n: int = 1) -> None:
        """``n`` attempts in a row that got an answer (``attempt`` with ``ok``; the compiled
        lane's records come a batch at a time): a failure streak ends, and each one walks
        the ejection backoff back a step, unless the backend is ejected now."""
        h = self.backends.get(backend)
        if h is None:
            return
        h.failures = 0
        if not (h.until and h.until_state == "ejected"):
            h.ejections = max(0, h.ejections - n)

    def retry_after(self, backend: str, seconds: float, mono: float, wall: float
                    ) -> str | None:
        """A 429 saying when to come back: cool the backend down that long (capped)."""
        h = self.backends.get(backend)
        seconds = min(seconds, self.settings.max_retry_after_s)
        if h is None or seconds <= 0 or (self._held(h, mono) and h.until >= mono + seconds):
            return None
        self._hold(h, mono + seconds, "cooling", wall, f"429, Retry-After {seconds:.0f}s")
        return "cooling"

    def _hold(self, h: BackendHealth, until: float, state: str, wall: float, why: str) -> None:
        if not h.until:
            self.down += 1
        h.until, h.until_state, h.until_since, h.until_reason = until, state, wall, why

    def _held(self, h: BackendHealth, mono: float) -> bool:
        """Ejected or cooling now; clears a hold whose time is up."""
        if not h.until:
            return False
        if mono < h.until:
            return True
        h.until, h.until_state, h.until_reason = 0.0, "", ""
        self.down -= 1
        return False

    # ------------------------------------------------------------ reading

    def available(self, backend: str, mono: float) -> bool:
        h = self.backends.get(backend)
        return h is None or not (h.probe_down or self._held(h, mono))

    def snapshot(self, mono: float) -> dict[str, Any]:
        """``GET /extproc/health``: every backend's state as this service process sees it."""
        return {"object": "list", "data": [self.state(b, mono) for b in self.backends]}

    def state(self, backend: str, mono: float) -> dict[str, Any]:
        """What the decision record and the status endpoint say of a backend."""
        h = self.backends.get(backend)
        if h is None:
            return {"backend": backend, "state": "unknown"}
        if h.probe_down:
            return {"backend": backend, "state": "unhealthy", "since": h.probe_since,
                    "reason": f"health probe failed: {h.probe_reason}"}
        if self._held(h, mono):
            return {"backend": backend, "state": h.until_state, "since": h.until_since,
                    "reason": h.until_reason, "for_s": round(h.until - mono, 1)}
        return {"backend": backend, "state": "healthy"}


def retry_after_seconds(value: str | None, wall: float) -> float | None:
    """A Retry-After header in seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        from email.utils import parsedate_to_datetime

        return max(0.0, parsedate_to_datetime(value).timestamp() - wall)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def answered_by(rec: dict[str, Any]) -> str | None:
    """The backend a completed record tells ``observe`` only that it answered (one attempt,
    no 5xx, 429 or upstream failure: ``Health.answered``), or None: records of that kind can
    be told many at once."""
    attempts = rec.get("attempts") or []
    status = rec.get("status") or 0
    if len(attempts) == 1 and 0 < status < 500 and status != 429 and \
            rec.get("outcome") not in ("upstream_failed", "rejected"):
        return attempts[0].get("backend")
    return None


def observe(health: Health, rec: dict[str, Any], retry_after: str | None, mono: float,
            wall: float) -> list[tuple[str, str]]:
    """Feed one completed decision record's attempts to ``health`` (passive detection): an
    attempt Envoy retried failed, unless the attempt stage noted why (a capability gap, a bad
    answer, a 429: not the backend being down); the last attempt failed when the client got
    a 5xx or an upstream failure. Returns the transitions, (backend, state)."""
    if rec.get("outcome") == "rejected" or not rec.get("status"):
        return []  # answered by the route stage, or the client left
    noted = {r.get("attempt") for r in rec.get("capability_retries") or ()}
    out = []
    attempts = rec.get("attempts") or []
    for i, a in enumerate(attempts, start=1):
        backend = a.get("backend")
        if not backend:
            continue
        last = i == len(attempts)
        status = rec["status"] if last else 0
        if last and status == 429:
            seconds = retry_after_seconds(retry_after, wall)
            moved = health.retry_after(backend, seconds, mono, wall) if seconds else None
        elif last:
            failed = status >= 500 or rec.get("outcome") == "upstream_failed"
            moved = health.attempt(backend, not failed, f"HTTP {status}", mono, wall)
        elif i in noted:
            continue
        else:
            moved = health.attempt(backend, False, "failed, retried", mono, wall)
        if moved:
            out.append((backend, moved))
    return out
