"""Adapt a request body to the backend it goes to: describe images for a model that cannot see,
fetch and reshape the parts the backend cannot take, drop a `metadata` it refuses, name its
model. Parsed once, serialised once.

The route stage adapts a body once per request when every candidate would get the same one
(the attempt stage then has nothing to do on the request side: three gRPC messages fewer per
attempt); the attempt stage adapts it per attempt otherwise.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from .. import metrics
from ..contract import RESP_CONVERTED, RESP_VISION
from ..core.endpoints import Origin
from ..core.errors import Refusal, error_reply
from ..core.parts import (
    Part,
    PartsReport,
    convert_body,
    fetch_targets,
    inspect_parts,
    transcodes,
)
from ..core.plan import BodyWork
from .fetch import FetchBudget
from .vision import VisionError, failure_text, substitution_text

if TYPE_CHECKING:  # the runtime holds the clients this uses
    from ..runtime import Runtime

# What a message to Envoy carries besides the body (headers, dynamic metadata).
MESSAGE_HEADROOM = 256 * 1024


@dataclass(slots=True)
class _Image:
    part: Part
    prompt: str
    raw: bytes | None = None      # inline images: decoded at once (for the cache key)
    mime: str = "image/png"
    key: str | None = None
    hit: str | None = None        # the cached description


class BodyAdapter:
    """Does one ``BodyWork`` (the planner decides it, the same way in both stages): ``plan``
    (no waiting), then ``run``. ``tags`` says what was done, as response headers
    (``x-extproc-converted-parts``, ``x-extproc-vision``)."""

    def __init__(self, rt: Runtime, work: BodyWork, owner: str = "-"):
        self.rt, self.backend, self.model = rt, work.backend, work.model
        self.substitute, self.drop_metadata = work.substitute, work.drop_metadata
        self.owner = owner  # the request: fair turns at the aux model, fetches, transcodes
        self.budget = FetchBudget(rt.config.fetch.max_bytes_per_request)
        self.tags: list[tuple[str, str]] = []
        self.body = b""  # the adapted body, once run
        self.data: dict[str, Any] = {}   # the chat body the part work is done on
        # Another API's body adapted through its chat view: the body itself, the view's parts
        # as they were (identity tells what changed), where each came from.
        self.native: dict[str, Any] | None = None
        self.before: dict[tuple[int, int], Any] = {}
        self.origins: dict[tuple[int, int], Origin] = {}
        self.work = work
        self.report = PartsReport()
        self.fetch: list[Part] = []
        self.images: list[_Image] = []

    def plan(self, data: dict[str, Any], parts: list[Part] | None = None) -> float:
        """Look at the parsed body (the route stage validated it; ``parts``: its parts as the
        route stage found them, not looked for again). Returns how long ``run`` may
        wait on the network (fetches, image descriptions not cached yet), capped at Envoy's
        longest message timeout; 0 when it will not wait, so the caller extends Envoy's message
        timeout only when needed (that answer is a gRPC message of its own)."""
        translator = self.work.endpoint.translator
        if translator is not None:  # read through its chat view (translated: sent as that)
            preset = self.rt.planner.backends[self.backend].preset
            view = translator.to_chat(data, self.work.translated, preset)
            if not self.work.translated:
                self.native, self.origins = data, view.origins
                self.before = {k: view.data["messages"][k[0]]["content"][k[1]]
                               for k in view.origins}
            data, parts = view.data, None if self.work.translated else parts
        self.data = data
        self.report = PartsReport(parts) if parts is not None else \
            inspect_parts(data, validate=False)
        vision = self.rt.vision
        describe = fetch = False
        if self.substitute and vision is not None:
            for p in self.report.parts:
                if p.sig.kind != "image":
                    continue
                img = _Image(p, vision.prompt_for(self._user_text(p.msg)))
                if p.b64 is not None:
                    img.raw, img.mime = base64.b64decode(p.b64), p.mime or "image/png"
                    img.key = vision.key(img.raw, img.prompt)
                    img.hit = vision.cached(img.key)
                describe = describe or img.hit is None
                fetch = fetch or img.raw is None
                self.images.append(img)
            calls = sum(img.hit is None for img in self.images)
            if calls > vision.cfg.max_images_per_request:
                raise Refusal(error_reply(
                    400, f"The request has {calls} images to describe for {self.model}, which "
                    f"cannot see; at most {vision.cfg.max_images_per_request} are described "
                    "per request (vision.max_images_per_request)", code="too_many_images",
                    param="messages"))
        # Described images are text by the time parts are converted: never fetched for that.
        self.fetch = [p for p in fetch_targets(self.rt.table.profiles[self.backend], self.report)
                      if not (self.images and p.sig.kind == "image")]
        if not (describe or fetch or self.fetch):
            return 0.0
        cfg = self.rt.config
        wait = 5.0 + (cfg.fetch.timeout_s if fetch or self.fetch else 0.0) + \
            (2 * vision.cfg.timeout_s if describe and vision is not None else 0.0)
        return min(wait, cfg.envoy.max_message_timeout_ms / 1000)

    def at_once(self) -> bool:
        """Whether the planned work waits on nothing (a translation, parts reshaped in place,
        metadata dropped): ``run_now`` then does it without a task or a turn of the loop."""
        return not self.images and not self.fetch and \
            not transcodes(self.rt.table.profiles[self.backend], self.report)

    def run_now(self) -> bytes:
        """``run`` for work that waits on nothing (``at_once``)."""
        cfg = self.rt.config
        return self._adapted(convert_body(self.data, self.report,
                                          self.rt.table.profiles[self.backend], {},
                                          cfg.service.max_decoded_audio_bytes))

    async def run(self) -> bytes:
        """The adapted body. Raises Refusal (400/4xx/5xx replies; with ``on_failure: reject``,
        also when the aux model fails)."""
        data, cfg = self.data, self.rt.config
        if self.images:
            await self._substitute_images()
        profile = self.rt.table.profiles[self.backend]
        fetched = await self._fetch_all(self.fetch) if self.fetch else {}
        limit = cfg.service.max_decoded_audio_bytes
        if transcodes(profile, self.report):  # decoding audio: off the loop, a few at once
            async with self.rt.transcodes.slot(self.owner):
                converted = await asyncio.to_thread(convert_body, data, self.report, profile,
                                                    fetched, limit)
        else:
            converted = convert_body(data, self.report, profile, fetched, limit)
        return self._adapted(converted)

    def _adapted(self, converted: int) -> bytes:
        """The body once its parts are converted (``converted`` of them): written back in the
        client's API when it was read through a chat view, serialised, its size checked."""
        data, cfg = self.data, self.rt.config
        if converted:
            self.tags.append((RESP_CONVERTED, str(converted)))
            metrics.PART_CONVERSIONS.labels(self.backend).inc(converted)
        if self.native is not None:  # the parts that changed, back in the client's shapes
            translator = self.work.endpoint.translator
            assert translator is not None
            for (i, j), old in self.before.items():
                new = data["messages"][i]["content"][j]
                if new is not old:
                    translator.write_back(self.native, self.origins[(i, j)], new)
            data = self.native
        if self.drop_metadata:
            data.pop("metadata", None)
        data["model"] = self.model
        body = orjson.dumps(data)
        # It goes back to Envoy in one gRPC message, and Envoy buffers it: over either limit
        # the request would fail later, with gRPC's or Envoy's own words.
        limit = min(cfg.envoy.max_body_bytes, cfg.service.max_message_bytes - MESSAGE_HEADROOM)
        if len(body) > limit:
            raise Refusal(error_reply(
                413, f"The request adapted for {self.backend} is {len(body)} bytes, over the "
                f"{limit}-byte limit of what Envoy takes back (envoy.max_body_bytes, "
                "service.max_message_bytes)", code="adapted_body_too_large", param="messages"))
        return body

    def _user_text(self, msg_index: int) -> str:
        content = self.data["messages"][msg_index].get("content")
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict)
                        and isinstance(p.get("text"), str)) if isinstance(content, list) else ""

    async def _fetch_all(self, parts: list[Part]) -> dict[str, tuple[str, bytes]]:
        urls = list(dict.fromkeys(p.url for p in parts if p.url))
        where = {p.url: p.path for p in parts}
        results = await asyncio.gather(*(self.rt.fetcher.fetch(u, where[u], self.owner,
                                                               self.budget) for u in urls))
        return dict(zip(urls, results, strict=True))

    async def _substitute_images(self) -> None:
        """Replace every image, in place, by a text part describing it (or saying it failed)."""
        vision = self.rt.vision
        assert vision is not None
        remote = [i.part for i in self.images if i.raw is None]
        fetched = await self._fetch_all(remote) if remote else {}

        async def one(img: _Image) -> tuple[str, bool] | VisionError:
            if img.hit is not None:
                return img.hit, True
            if img.raw is None:
                img.mime, img.raw = fetched[img.part.url or ""]
            try:
                return await vision.describe(img.raw, img.mime, img.prompt, img.key,
                                             self.owner)
            except VisionError as exc:
                return exc

        results = await asyncio.gather(*(one(i) for i in self.images))
        cached = 0
        for n, (img, res) in enumerate(zip(self.images, results, strict=True), start=1):
            if isinstance(res, VisionError):
                if vision.cfg.on_failure == "reject":
                    raise res
                text = failure_text(n, vision.cfg.model, res.message)
            else:
                text = substitution_text(n, vision.cfg.model, self.model, res[0])
                cached += res[1]
            p = img.part
            self.data["messages"][p.msg]["content"][p.idx] = {"type": "text", "text": text}
        self.report.parts = [p for p in self.report.parts if p.sig.kind != "image"]
        failed = sum(isinstance(r, VisionError) for r in results)
        aux, images = vision.cfg.model, len(self.images)
        metrics.VISION.labels(aux, "described").inc(images - failed - cached)
        metrics.VISION.labels(aux, "cached").inc(cached)
        metrics.VISION.labels(aux, "failed").inc(failed)
        self.tags.append((RESP_VISION, f"substituted={images - failed}; cached={cached}; "
                                       f"failed={failed}; model={aux}"))
