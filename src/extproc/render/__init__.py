"""Envoy's config, rendered from the service config: one builder per resource (``filters``,
``routes``, ``clusters``), assembled into a complete bootstrap or into the snippets an existing
Envoy needs."""

from .bootstrap import render, render_yaml
from .filters import client_keys
from .routes import max_candidates, stream_idle_limits
from .snippets import render_snippets

__all__ = ["client_keys", "max_candidates", "render", "render_snippets", "render_yaml",
           "stream_idle_limits"]
