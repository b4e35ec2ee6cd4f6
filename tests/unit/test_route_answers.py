"""Which route-stage answers are computed inside the read that brought the message: body work
that waits on nothing (a translation) is answered at once, no task and no turn of the event
loop; work that waits on the network (an image to describe) is answered by a task."""

from __future__ import annotations

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.config import parse_config
from extproc.runtime import Runtime
from extproc.shell.route_stage import RouteStream

CFG = parse_config({
    "backends": [
        {"name": "chat", "preset": "openai", "url": "http://127.0.0.1:8001/v1",
         "models": [{"name": "m1", "capabilities": ["vision"]}]},
        {"name": "blind", "preset": "llamacpp", "url": "http://127.0.0.1:8002/v1",
         "models": [{"name": "text", "capabilities": ["tools"]}]}],  # (cannot see)
    "models": [{"name": "pub", "candidates": [{"backend": "chat", "model": "m1"}]},
               {"name": "blind", "candidates": [{"backend": "blind", "model": "text"}]}],
    "vision": {"backend": "chat", "model": "m1"},
})


def respond(path: str, body: dict) -> object:
    stream = RouteStream(Runtime.build(CFG, env={}))
    headers = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode())
                                          for k, v in ((":method", "POST"), (":path", path))])
    stream.respond(pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=headers)))
    return stream.respond(pb.ProcessingRequest(request_body=pb.HttpBody(
        body=orjson.dumps(body), end_of_stream=True)))


def test_a_translation_is_answered_at_once() -> None:
    out = respond("/v1/messages", {"model": "pub", "max_tokens": 8,
                                   "messages": [{"role": "user", "content": "hi"}]})
    assert isinstance(out, pb.ProcessingResponse)
    sent = orjson.loads(out.request_body.response.body_mutation.body)
    assert sent["messages"] == [{"role": "user", "content": "hi"}] and sent["max_tokens"] == 8


def test_an_image_to_describe_is_answered_by_a_task() -> None:
    png = "data:image/png;base64,iVBORw0KGgo="
    out = respond("/v1/chat/completions", {"model": "blind", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png}}]}]})
    assert not isinstance(out, pb.ProcessingResponse) and hasattr(out, "__anext__")
