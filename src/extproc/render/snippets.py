"""The pieces an existing Envoy needs, as Markdown with YAML blocks (``extproc envoy
--snippets``; docs/how-it-works.md, "attach to your own Envoy"), built from the same builders
as the complete bootstrap."""

from __future__ import annotations

from typing import Any

import yaml

from ..config import Config
from ..contract import DECISION_HEADERS, DECISION_LOG_NAME, META_NS
from .clusters import backend_clusters, service_cluster
from .filters import decision_log, http_filters
from .routes import route_config


def ai_gateway_resources(cfg: Config, gateway: str = "envoy-ai-gateway",
                         service: str = "llm-extproc") -> list[dict[str, Any]]:
    """Inside Envoy AI Gateway (``ai_gateway.model_header``): the Envoy Gateway resources that
    attach the route stage (``service``: its Kubernetes Service) to ``gateway`` and put it
    before AI Gateway's own processing. deploy/kubernetes/ ships these (a test checks), and
    conformance/test_4_aigw.py runs them in a real AI Gateway."""
    e = cfg.envoy
    seconds = e.message_timeout_ms / 1000
    on_gateway = [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway}]
    return [{
        "apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "EnvoyExtensionPolicy",
        "metadata": {"name": service},
        "spec": {"targetRefs": on_gateway, "extProc": [{
            "backendRefs": [{"name": service, "port": cfg.service.port}],
            # Request headers and the buffered body only: the route stage never answers
            # response messages (asking for them makes every request a 504).
            "processingMode": {"request": {"body": "Buffered"}},
            "messageTimeout": f"{seconds:g}s",
            "failOpen": e.failure_mode_allow,
            # (the decision record travels in our metadata namespace to the access log)
            "metadata": {"writableNamespaces": [META_NS]}}]},
    }, {
        # AI Gateway inserts its ext_proc filter before the first ext_proc filter unless a
        # buffer filter sits at or after that point: then after the last buffer filter.
        "apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "EnvoyProxy",
        "metadata": {"name": f"{service}-first"},
        "spec": {
            "filterOrder": [{"name": "envoy.filters.http.buffer",
                             "after": "envoy.filters.http.ext_proc"}],
            # Each request's access log entry back to the service: its decision record.
            "telemetry": {"accessLog": {"settings": [{"sinks": [{"type": "ALS", "als": {
                "backendRefs": [{"name": service, "port": cfg.service.port}],
                "type": "HTTP", "logName": DECISION_LOG_NAME,
                "http": {"requestHeaders": [cfg.hints.client_header],
                         "responseHeaders": [*DECISION_HEADERS, "retry-after"]}}}]}]}}},
    }, {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "BackendTrafficPolicy",
        "metadata": {"name": f"{service}-request-buffer"},
        "spec": {"targetRefs": on_gateway,
                 "requestBuffer": {"limit": f"{e.max_body_bytes // (1024 * 1024)}Mi"}},
    }]


def render_snippets(cfg: Config) -> str:
    keys = ("name", "circuit_breakers", "load_balancing_policy",
            "typed_extension_protocol_options")
    pools = {"clusters": [{k: c[k] for k in keys} for c in backend_clusters(cfg)]}

    def block(title: str, value: object) -> str:
        text = yaml.safe_dump(value, sort_keys=False, width=100)
        return f"{title}\n\n```yaml\n{text}```\n"

    if cfg.ai_gateway.model_header:
        docs = "---\n".join(yaml.safe_dump(d, sort_keys=False, width=100)
                            for d in ai_gateway_resources(cfg))
        return ("Inside Envoy AI Gateway (ai_gateway.model_header): these Envoy Gateway "
                "resources attach the route stage to your Gateway (rename `envoy-ai-gateway`), "
                "before AI Gateway's own processing; your Gateway names the EnvoyProxy in "
                "spec.infrastructure.parametersRef (docs/deployment.md).\n\n```yaml\n"
                f"{docs}```\n")

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
