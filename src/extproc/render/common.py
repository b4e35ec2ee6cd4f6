"""Small pieces every Envoy builder uses."""

from __future__ import annotations

from typing import Any

EXT_PROC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ROUTER = {"name": "envoy.filters.http.router", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
            ".v3.HttpConnectionManager")


def dur(seconds: float) -> str:
    return f"{seconds:.3f}s"


def sock(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def cel(expression: str) -> dict[str, Any]:
    """An access-log / local-reply filter on a CEL expression."""
    return {"extension_filter": {
        "name": "envoy.access_loggers.extension_filters.cel",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3."
                     "ExpressionFilter",
            "expression": expression}}}
