"""``/v1/chat/completions``: the shape everything else is read in.

Reads ``model``, ``messages`` (content parts), ``tools``/``tool_choice``,
``response_format``, ``reasoning_effort``, ``metadata`` (routing hints), ``stream``. May
change ``model``, content parts (reshaped, fetched, transcoded, images described), and drop
``metadata`` (routing keys; all of it for a backend that takes it only with ``store``).
"""

from __future__ import annotations

from .base import Api, Endpoint

ENDPOINTS = (Endpoint(Api.CHAT, "/v1/chat/completions", dialect="chat"),)
