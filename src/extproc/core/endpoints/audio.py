"""``/v1/audio/transcriptions`` and ``/v1/audio/translations`` (multipart uploads) and
``/v1/audio/speech`` (JSON in, audio bytes out).

Uploads: reads the ``model`` and ``stream`` form fields; may change the ``model`` field's value
only, every other byte (the file above all) is passed on as it came. Speech: reads ``model``;
may change ``model``; the answer passes untouched.
"""

from __future__ import annotations

from .base import Api, Endpoint

ENDPOINTS = (Endpoint(Api.TRANSCRIPTIONS, "/v1/audio/transcriptions", form=True),
             Endpoint(Api.TRANSLATIONS, "/v1/audio/translations", form=True),
             Endpoint(Api.SPEECH, "/v1/audio/speech"))
