"""Everything compiled from one config, built once and swapped whole."""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .config import Config, ConfigError, backend_endpoint
from .core.backends import BackendRuntime, MissingCredential, backend_runtimes
from .core.discovery import NOTHING, Catalog
from .core.health import Health
from .core.plan import Planner
from .core.routing import RoutingTable
from .effects.fetch import Fetcher, FetchPolicy
from .effects.schema_judge import SchemaJudge
from .effects.sharing import FairLimiter
from .effects.vision import AuxEndpoint, VisionClient


@dataclass(frozen=True, slots=True)
class Runtime:
    """The composition root: the pure parts compiled from one config (table, planner) and the
    effects' clients and state (fetches, aux vision, schema checks, transcodes, health)."""

    config: Config
    table: RoutingTable
    planner: Planner
    backends: dict[str, BackendRuntime]
    fetcher: Fetcher
    vision: VisionClient | None
    schema_judge: SchemaJudge
    transcodes: FairLimiter
    health: Health
    # Attempt outcomes the route stage's decision record picks up (same process only).
    notes: OrderedDict[str, list[dict[str, Any]]] = field(default_factory=OrderedDict)

    def note(self, request_id: str, entry: dict[str, Any]) -> None:
        self.notes.setdefault(request_id, []).append(entry)
        while len(self.notes) > 10_000:
            self.notes.popitem(last=False)

    @classmethod
    def build(cls, cfg: Config, env: dict[str, str] | None = None,
              previous: Runtime | None = None, catalog: Catalog | None = None) -> Runtime:
        """Compile a config (and what discovery found: ``catalog``, else the previous
        runtime's); on reload, keep the caches whose settings did not change."""
        env = dict(os.environ) if env is None else env
        f = cfg.fetch
        policy = FetchPolicy(f.timeout_s, f.max_bytes, f.allow_private, frozenset(f.allow_hosts),
                             f.allow_http, f.max_redirects, f.ca_bundle, f.concurrency)
        backends = backend_runtimes(cfg, env)
        vision = None
        if cfg.vision is not None:
            v = cfg.vision
            if v.backend is not None:
                b = backends[v.backend]
                ep = backend_endpoint(next(x.url for x in cfg.backends if x.name == v.backend))
                base = f"{ep.scheme}://{ep.hostname or ep.host}:{ep.port}{b.base_path}"
                endpoint = AuxEndpoint(base + "/chat/completions", b.auth_header, b.auth_value)
            else:
                assert v.url is not None
                key = env.get(v.api_key_env, "") if v.api_key_env else ""
                if v.api_key_env and not key:
                    raise MissingCredential(f"vision: environment variable {v.api_key_env} is not set")
                endpoint = AuxEndpoint(v.url.rstrip("/") + "/chat/completions",
                                       "authorization" if key else None,
                                       f"Bearer {key}" if key else None)
            same = previous is not None and previous.vision is not None and \
                (previous.vision.cfg, previous.vision.endpoint) == (v, endpoint)
            # The same aux model keeps its cache across a reload.
            vision = previous.vision if same and previous else VisionClient(v, endpoint)
        try:
            fetcher = previous.fetcher if previous and previous.fetcher.policy == policy \
                else Fetcher(policy)
        except (OSError, ValueError) as exc:  # ssl cannot load the CA bundle
            raise ConfigError([f"fetch.ca_bundle: cannot load {f.ca_bundle}: {exc}"]) from None
        cr = cfg.capability_routing
        judge = previous.schema_judge if previous else SchemaJudge(cr.judge_timeout_s)
        # One pool per process, whatever the reloads: its children outlive any one config.
        judge.timeout_s, judge.workers = cr.judge_timeout_s, cr.judge_workers
        judge.max_schema_bytes = cr.judge_max_schema_bytes
        names = [b.name for b in cfg.backends]
        health = previous.health if previous else Health(cfg.health, names)
        health.reconfigure(cfg.health, names)  # what is known of a backend outlives reloads
        if catalog is None:
            catalog = previous.table.catalog if previous else NOTHING
        table = RoutingTable(cfg, catalog)
        return cls(cfg, table, Planner(cfg, table, backends), backends, fetcher, vision, judge,
                   FairLimiter(cfg.service.transcode_concurrency), health,
                   previous.notes if previous else OrderedDict())
