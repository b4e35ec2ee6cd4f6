"""``/v1/rerank`` (Cohere/Jina shape: ``query``, ``documents``) and ``/v1/score`` (vLLM:
``text_1``, ``text_2``). Reads ``model``; may change ``model``."""

from __future__ import annotations

from .base import Api, Endpoint

ENDPOINTS = (Endpoint(Api.RERANK, "/v1/rerank"), Endpoint(Api.SCORE, "/v1/score"))
