"""``/v1/completions`` (legacy text completions) and ``/v1/embeddings``.

Reads ``model`` (and ``metadata`` hints, ``stream``). May change ``model`` only.
"""

from __future__ import annotations

from .base import Api, Endpoint

ENDPOINTS = (Endpoint(Api.COMPLETIONS, "/v1/completions"),
             Endpoint(Api.EMBEDDINGS, "/v1/embeddings"))
