"""``/v1/images/generations``: reads ``model`` (and ``metadata`` hints); may change ``model``."""

from __future__ import annotations

from .base import Api, Endpoint

ENDPOINTS = (Endpoint(Api.IMAGES, "/v1/images/generations"),)
