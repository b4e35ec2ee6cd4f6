"""The effects without a network: the body adapter (reshape, drop metadata, budgets) and the
aux vision client (cache, one call per image shared by every caller, failures named), the aux
model being an in-process server behind httpx's MockTransport."""

from __future__ import annotations

import asyncio
import base64

import httpx
import orjson
import pytest

from extproc.config import VisionSettings, parse_config
from extproc.core.errors import Refusal
from extproc.core.plan import BodyWork
from extproc.effects.adapt import BodyAdapter
from extproc.effects.vision import AuxEndpoint, VisionClient, VisionError
from extproc.runtime import Runtime

from ..media import b64, clip, data_url, png

WAV = clip("wav")
RT = Runtime.build(parse_config({
    "backends": [
        {"name": "l", "preset": "llamacpp", "url": "http://127.0.0.1:8003/v1",
         "models": [{"name": "m"}]},
        {"name": "o", "preset": "openai", "url": "http://127.0.0.1:8004/v1",
         "models": [{"name": "g"}]}],
    "envoy": {"max_body_bytes": 1024 * 1024}}), env={})


def chat(*parts: dict, **extra: object) -> dict:
    return {"model": "x", "messages": [{"role": "user", "content": list(parts)}], **extra}


async def test_adapter_reshapes_parts_and_names_the_model() -> None:
    adapter = BodyAdapter(RT, BodyWork("l", "m"), "r1")
    data = chat({"type": "audio_url", "audio_url": {"url": data_url("audio/wav", WAV)}})
    assert adapter.plan(data) == 0.0  # nothing to wait for: no extension message
    body = orjson.loads(await adapter.run())
    assert body["model"] == "m"
    assert body["messages"][0]["content"] == [
        {"type": "input_audio", "input_audio": {"data": b64(WAV), "format": "wav"}}]
    assert adapter.tags == [("x-extproc-converted-parts", "1")]


async def test_adapter_drops_metadata_and_refuses_bodies_envoy_could_not_take() -> None:
    adapter = BodyAdapter(RT, BodyWork("o", "g", drop_metadata=True))
    adapter.plan(chat({"type": "text", "text": "hi"}, metadata={"k": "v"}))
    assert "metadata" not in orjson.loads(await adapter.run())
    huge = {"type": "input_audio", "input_audio": {"data": b64(b"\0" * 900_000),
                                                   "format": "wav"}}
    adapter = BodyAdapter(RT, BodyWork("o", "g", drop_metadata=True))
    adapter.plan(chat(huge, metadata={"k": "v"}))
    with pytest.raises(Refusal) as exc:
        await adapter.run()
    assert (exc.value.reply.status, exc.value.reply.code) == (413, "adapted_body_too_large")


class Aux:
    """An aux vision model: counts calls, answers after ``delay`` (or fails)."""

    def __init__(self, delay: float = 0.0, status: int = 200):
        self.calls, self.delay, self.status = 0, delay, status

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.status != 200:
            return httpx.Response(self.status, json={"error": "down"})
        n = len(orjson.loads(request.content)["messages"][0]["content"][1]["image_url"]["url"])
        return httpx.Response(200, json={"choices": [{"message": {
            "content": f"an image of {n} characters"}}]})


def client(aux: Aux, **settings: object) -> VisionClient:
    cfg = VisionSettings(url="http://aux/v1", model="ocr", **settings)
    return VisionClient(cfg, AuxEndpoint("http://aux/v1/chat/completions", None, None),
                        httpx.AsyncClient(transport=httpx.MockTransport(aux)))


async def test_vision_cache_and_one_call_per_image() -> None:
    aux = Aux(delay=0.05)
    vision = client(aux)
    image, prompt = png(), "describe"
    first, second = await asyncio.gather(vision.describe(image, "image/png", prompt, owner="a"),
                                         vision.describe(image, "image/png", prompt, owner="b"))
    assert aux.calls == 1  # one call, two callers
    assert {first[1], second[1]} == {False, True} and first[0] == second[0]
    assert await vision.describe(image, "image/png", prompt) == (first[0], True)  # cached
    assert aux.calls == 1
    await vision.describe(png(3, 3), "image/png", prompt)  # another image: another call
    assert aux.calls == 2


async def test_a_shared_call_outlives_its_first_caller() -> None:
    aux = Aux(delay=0.1)
    vision = client(aux)
    image = base64.b64decode(b64(png(4, 4)))
    leaving = asyncio.create_task(vision.describe(image, "image/png", "p"))
    await asyncio.sleep(0.01)
    staying = asyncio.create_task(vision.describe(image, "image/png", "p"))
    await asyncio.sleep(0.01)
    leaving.cancel()
    text, shared = await staying
    assert shared and text.startswith("an image of") and aux.calls == 1


async def test_vision_failures_name_the_aux_model() -> None:
    vision = client(Aux(status=500))
    with pytest.raises(VisionError) as exc:
        await vision.describe(png(), "image/png", "p")
    err = orjson.loads(exc.value.reply.body)["error"]
    assert (exc.value.reply.status, err["code"], err["aux_model"]) == (502, "aux_vision_error",
                                                                        "ocr")
    slow = client(Aux(delay=1.0), timeout_s=0.1)
    with pytest.raises(VisionError) as exc:
        await slow.describe(png(), "image/png", "p")
    assert exc.value.reply.status == 503 and exc.value.message == "no answer within 0.1s"
