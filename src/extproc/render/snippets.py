"""The pieces an existing Envoy needs, as Markdown with YAML blocks (``extproc envoy
--snippets``; docs/how-it-works.md, "attach to your own Envoy"), built from the same builders
as the complete bootstrap."""

from __future__ import annotations

import yaml

from ..config import Config
from .clusters import backend_clusters, service_cluster
from .filters import decision_log, http_filters
from .routes import route_config


def render_snippets(cfg: Config) -> str:
    keys = ("name", "circuit_breakers", "load_balancing_policy",
            "typed_extension_protocol_options")
    pools = {"clusters": [{k: c[k] for k in keys} for c in backend_clusters(cfg)]}

    def block(title: str, value: object) -> str:
        text = yaml.safe_dump(value, sort_keys=False, width=100)
        return f"{title}\n\n```yaml\n{text}```\n"

    return "\n".join([
        block("1. In your HTTP connection manager: the route stage before the router, and the "
              "access log that brings each decision record back to the service with its "
              "outcome.", {"http_filters": http_filters(cfg), "access_log": [decision_log(cfg)]}),
        block("2. Its route config: the cluster comes from a header only the route stage can "
              "set; retries walk the candidates.", {"route_config": route_config(cfg)}),
        block("3. The backend pool clusters: per-request endpoint order and the attempt stage "
              "on every attempt, and its twins for requests the route stage prepared whole: "
              "without the attempt stage, and with its response side only; all three drop a "
              "backend's copies of our response headers (add your `type`, `connect_timeout` "
              "and the same endpoints to all three: one per backend, by IP address).", pools),
        block("4. The service itself, over HTTP/2 (keep its buffer limit well above your "
              "largest body).", service_cluster(cfg)),
    ])
