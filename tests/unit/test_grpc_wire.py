"""The HTTP/2 server side (shell/grpc_wire.py), sans-IO: frames in as a client would send them
(hostile ones too), events and frames out, decoded with an independent HPACK decoder."""

from __future__ import annotations

import pytest
from hpack import Decoder, Encoder, NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.shell import grpc_wire as w
from extproc.shell.grpc_wire import Connection, frame


def parse(data: bytes) -> list[tuple[int, int, int, bytes]]:
    frames, pos = [], 0
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 3], "big")
        frames.append((data[pos + 3], data[pos + 4],
                       int.from_bytes(data[pos + 5:pos + 9], "big"), data[pos + 9:pos + 9 + n]))
        pos += 9 + n
    assert pos == len(data)
    return frames


def grpc_message(payload: bytes, compressed: bool = False) -> bytes:
    return bytes([compressed]) + len(payload).to_bytes(4, "big") + payload


class Client:
    """What a gRPC client puts on the wire, and what it reads back."""

    def __init__(self, max_message: int = 1 << 20, settings: bytes = b""):
        self.conn = Connection(max_message)
        self.enc, self.dec = Encoder(), Decoder()
        greeting = parse(self.conn.data_to_send())
        assert greeting[0][0] == w.SETTINGS and greeting[1][0] == w.WINDOW_UPDATE
        self.events = self.conn.receive(w.PREFACE + frame(w.SETTINGS, 0, 0, settings))
        assert parse(self.conn.data_to_send()) == [(w.SETTINGS, w.ACK, 0, b"")]

    def send(self, data: bytes) -> list:
        return self.conn.receive(data)

    def open(self, sid: int, path: str = "/s/M", end: bool = False, **extra: str) -> list:
        block = self.enc.encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                                 (":authority", "x"), ("content-type", "application/grpc"),
                                 ("te", "trailers"), *extra.items()])
        return self.send(frame(w.HEADERS, w.END_HEADERS | (w.END_STREAM if end else 0), sid,
                               block))

    def read(self) -> list[tuple[int, int, int, object]]:
        """Frames sent since the last read; header blocks decoded."""
        out: list[tuple[int, int, int, object]] = []
        for kind, flags, sid, payload in parse(self.conn.data_to_send()):
            out.append((kind, flags, sid, dict(self.dec.decode(payload)) if kind == w.HEADERS
                        else payload))
        return out


def test_a_call_opens_carries_messages_and_ends_with_trailers() -> None:
    c = Client()
    (started,) = c.open(1, "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
                        **{"x-extproc-stage": "attempt"})
    assert started == w.Started(1, b"/envoy.service.ext_proc.v3.ExternalProcessor/Process",
                                started.headers)
    assert started.headers[b"x-extproc-stage"] == b"attempt"
    events = c.send(frame(w.DATA, 0, 1, grpc_message(b"one") + grpc_message(b"")) +
                    frame(w.DATA, w.END_STREAM, 1, grpc_message(b"two")))
    assert events == [w.Message(1, b"one"), w.Message(1, b""), w.Message(1, b"two"),
                      w.HalfClosed(1)]
    c.conn.reply(1, b"answer")
    c.conn.finish(1)
    (h, d, t) = c.read()
    assert h == (w.HEADERS, w.END_HEADERS, 1, {":status": "200",
                                                "content-type": "application/grpc"})
    assert d == (w.DATA, 0, 1, grpc_message(b"answer"))
    assert t == (w.HEADERS, w.END_HEADERS | w.END_STREAM, 1, {"grpc-status": "0"})
    assert c.conn.idle()


def test_an_error_before_any_answer_is_trailers_only_and_its_message_encoded() -> None:
    c = Client()
    c.open(1, end=True)
    c.conn.finish(1, w.NOT_FOUND, "unknown service: 50% ü")
    ((kind, flags, sid, headers),) = c.read()
    assert (kind, flags, sid) == (w.HEADERS, w.END_HEADERS | w.END_STREAM, 1)
    assert headers == {":status": "200", "content-type": "application/grpc",
                       "grpc-status": "5", "grpc-message": "unknown service: 50%25 %C3%BC"}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 400), max_size=40), st.booleans())
def test_any_split_of_the_bytes_gives_the_same_events(cuts: list[int], padded: bool) -> None:
    c = Client()
    body = bytes(range(256)) * 8
    data = Encoder().encode([(":path", "/s/M"), ("content-type", "application/grpc")])
    wire = frame(w.HEADERS, w.END_HEADERS, 1, data)
    msgs = grpc_message(body) + grpc_message(b"x")
    half = len(msgs) // 2
    first = bytes([3]) + msgs[:half] + b"\0\0\0" if padded else msgs[:half]
    wire += frame(w.DATA, w.PADDED if padded else 0, 1, first)
    wire += frame(w.DATA, w.END_STREAM, 1, msgs[half:])
    events, pos = [], 0
    for cut in cuts:
        events += c.send(wire[pos:pos + cut])
        pos += cut
    events += c.send(wire[pos:])
    assert [e for e in events if not isinstance(e, w.Started)] == [
        w.Message(1, body), w.Message(1, b"x"), w.HalfClosed(1)]


def test_a_repeated_header_block_is_decoded_once_while_the_table_holds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Envoy opens every stream with the same bytes; the same bytes mean other headers once
    the dynamic table entry they point at has been replaced."""
    c = Client()
    decoded: list[bytes] = []
    real = c.conn.decoder.decode
    monkeypatch.setattr(c.conn.decoder, "decode",
                        lambda block, raw: decoded.append(block) or real(block, raw=raw))
    fixed = Encoder().encode([NeverIndexedHeaderTuple(k, v) for k, v in (
        (":method", "POST"), (":path", "/s/M"), ("content-type", "application/grpc"))])

    def stored(value: bytes) -> bytes:  # literal with incremental indexing: entry 62
        return bytes([0x40, 7]) + b"x-stage" + bytes([len(value)]) + value

    point = fixed + bytes([0x80 | 62])  # indexed: the newest dynamic entry, whatever it is

    def stage(sid: int, block: bytes) -> list[bytes]:
        events = c.send(frame(w.HEADERS, w.END_HEADERS, sid, block))
        return [e.headers[b"x-stage"] for e in events if isinstance(e, w.Started)]

    assert stage(1, fixed + stored(b"route")) == [b"route"]
    assert [stage(sid, point) for sid in (3, 5, 7)] == [[b"route"]] * 3
    assert decoded.count(point) == 1  # streams 5 and 7 took stream 3's decoding
    assert stage(9, fixed + stored(b"attempt")) == [b"attempt"]
    assert stage(11, point) == [b"attempt"]  # the very same bytes, decoded afresh
    assert decoded.count(point) == 2


def test_answers_wait_for_the_peers_windows_and_frame_size() -> None:
    c = Client(settings=w.S_INITIAL_WINDOW_SIZE.to_bytes(2, "big") + (10).to_bytes(4, "big"))
    c.open(1, end=True)
    c.conn.reply(1, b"a" * 100)
    c.conn.finish(1)
    out = c.read()
    assert [(k, len(p)) for k, _, _, p in out if k == w.DATA] == [(w.DATA, 10)]
    assert not any(f & w.END_STREAM for _, f, _, _ in out)  # the trailers wait for the data
    c.send(frame(w.WINDOW_UPDATE, 0, 1, (1000).to_bytes(4, "big")))
    out = c.read()
    assert b"".join(p for k, _, _, p in out if k == w.DATA) == grpc_message(b"a" * 100)[10:]
    assert out[-1][:3] == (w.HEADERS, w.END_HEADERS | w.END_STREAM, 1)
    # The connection's window (65,535 until the peer raises it) and 16 KiB frames.
    c.open(3, end=True)
    c.conn.reply(3, b"b" * 100_000)
    c.send(frame(w.WINDOW_UPDATE, 0, 3, (1 << 20).to_bytes(4, "big")))
    sent = [p for k, _, _, p in c.read() if k == w.DATA]
    assert max(map(len, sent)) == 16384
    assert sum(map(len, sent)) == 65535 - 10 - len(grpc_message(b"a" * 100)[10:])
    c.send(frame(w.WINDOW_UPDATE, 0, 0, (1 << 20).to_bytes(4, "big")))
    assert b"".join(p for k, _, _, p in c.read() if k == w.DATA)[-10:] == b"b" * 10


def test_a_streams_window_comes_back_only_once_its_messages_are_taken() -> None:
    c = Client(max_message=1000)  # a window of 2 * 1,005 bytes per stream
    c.open(1)
    c.send(frame(w.DATA, 0, 1, grpc_message(b"x" * 995)))
    c.conn.consumed(1)
    assert c.read() == []  # under half the window
    c.send(frame(w.DATA, 0, 1, grpc_message(b"x" * 995)))
    assert c.read() == []  # not taken yet: the client is held back
    c.conn.consumed(1)
    assert c.read() == [(w.WINDOW_UPDATE, 0, 1, (2000).to_bytes(4, "big"))]
    # A client that ignores the window loses the connection.
    events = c.send(frame(w.DATA, 0, 1, grpc_message(b"y" * 995)) * 3)
    assert events[-1] == w.Closed(w.FLOW_CONTROL_ERROR)
    assert c.read()[-1][0] == w.GOAWAY


def test_an_oversized_or_compressed_message_ends_only_its_stream() -> None:
    c = Client(max_message=100)
    c.open(1)
    events = c.send(frame(w.DATA, 0, 1, grpc_message(b"z" * 101)))
    assert events == [w.Refused(1)]
    c.open(3)
    events = c.send(frame(w.DATA, 0, 3, grpc_message(b"z", compressed=True)))
    assert events == [w.Refused(3)]
    c.open(5)
    events = c.send(frame(w.DATA, 0, 5, (200).to_bytes(5, "big")))  # a length, no body yet
    assert events == [w.Refused(5)]
    out = c.read()
    statuses = [(sid, p["grpc-status"]) for k, _, sid, p in out if k == w.HEADERS]
    assert statuses == [(1, "8"), (3, "12"), (5, "8")]
    assert [(k, sid) for k, _, sid, _ in out if k == w.RST_STREAM] == [
        (w.RST_STREAM, 1), (w.RST_STREAM, 3), (w.RST_STREAM, 5)]
    assert c.send(frame(w.DATA, w.END_STREAM, 1, b"late")) == []  # dropped
    events = c.open(7, end=True)
    assert [type(e) for e in events] == [w.Started, w.HalfClosed]  # the connection lives on


@pytest.mark.parametrize("wire, code", [
    (b"GET / HTTP/1.1\r\n\r\n" + b"x" * 20, w.PROTOCOL_ERROR),
    (frame(w.DATA, 0, 1, b"") [:3].replace(b"\0\0\0", (w.MAX_FRAME + 1).to_bytes(3, "big"))
     + b"\0" * 6, w.FRAME_SIZE_ERROR),
    (frame(w.HEADERS, w.END_HEADERS, 1, b"\xff\xff\xff\xff\xff\xff"), w.COMPRESSION_ERROR),
    (frame(w.HEADERS, 0, 1, b"\x82") + frame(w.PING, 0, 0, b"\0" * 8), w.PROTOCOL_ERROR),
    (frame(w.HEADERS, 0, 1, b"\x82") + frame(w.CONTINUATION, 0, 1, b"\0" * 16000) * 5,
     w.ENHANCE_YOUR_CALM),
    (frame(w.CONTINUATION, w.END_HEADERS, 1, b"\x82"), w.PROTOCOL_ERROR),
    (frame(w.HEADERS, w.END_HEADERS, 2, b"\x82"), w.PROTOCOL_ERROR),
    (frame(w.DATA, 0, 9, b"\0\0\0\0\0"), w.PROTOCOL_ERROR),
    (frame(w.PUSH_PROMISE, w.END_HEADERS, 1, b"\0\0\0\2"), w.PROTOCOL_ERROR),
    (frame(w.PING, 0, 0, b"short"), w.FRAME_SIZE_ERROR),
    (frame(w.SETTINGS, 0, 0, b"\0\5\0\0\0\1"), w.PROTOCOL_ERROR),
    (frame(w.SETTINGS, 0, 0, b"\0\4\xff\xff\xff\xff"), w.FLOW_CONTROL_ERROR),
    (frame(w.WINDOW_UPDATE, 0, 0, (w.MAX_WINDOW).to_bytes(4, "big")), w.FLOW_CONTROL_ERROR),
    (frame(w.WINDOW_UPDATE, 0, 0, b"\0\0\0\0"), w.PROTOCOL_ERROR),
])
def test_a_peer_breaking_http2_gets_a_goaway_naming_why(wire: bytes, code: int) -> None:
    conn = Connection(1 << 20)
    conn.data_to_send()
    if not wire.startswith(b"GET"):
        wire = w.PREFACE + wire
    events = conn.receive(wire)
    assert events[-1] == w.Closed(code)
    kind, _, _, payload = parse(conn.data_to_send())[-1]
    assert kind == w.GOAWAY and int.from_bytes(payload[4:8], "big") == code
    assert conn.receive(frame(w.PING, 0, 0, b"\0" * 8)) == []  # nothing more is read


def test_streams_go_in_order_and_up_to_a_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(w, "MAX_STREAMS", 2)
    c = Client()
    c.open(1)
    c.open(3)
    assert c.open(5) == []  # refused, its headers still decoded (the table stays in step)
    assert c.read() == [(w.RST_STREAM, 0, 5, w.REFUSED_STREAM.to_bytes(4, "big"))]
    c.send(frame(w.RST_STREAM, 0, 1, w.CANCEL.to_bytes(4, "big")))
    assert [type(e) for e in c.open(7)] == [w.Started]
    assert c.open(3)[-1] == w.Closed(w.PROTOCOL_ERROR)  # a second HEADERS, no END_STREAM


def test_ping_settings_and_unknown_frames() -> None:
    c = Client()
    assert c.send(frame(w.PING, 0, 0, b"12345678") + frame(0xEE, 0, 0, b"?") +
                  frame(w.PRIORITY, 0, 1, b"\0\0\0\0\x10")) == []
    assert c.read() == [(w.PING, w.ACK, 0, b"12345678")]
    c.send(frame(w.SETTINGS, 0, 0, w.S_HEADER_TABLE_SIZE.to_bytes(2, "big") + bytes(4)))
    c.open(1, end=True)
    c.conn.finish(1)
    strict = Decoder()  # a peer that allows us no table at all
    strict.max_allowed_table_size = 0
    (_, (_, _, _, block)) = parse(c.conn.data_to_send())
    assert block[:1] == b"\x20"  # the table's size set to 0 first: nghttp2 insists on it
    assert dict(strict.decode(block)) == {":status": "200", "content-type": "application/grpc",
                                          "grpc-status": "0"}


def test_shutdown_refuses_new_streams_and_lets_open_ones_finish() -> None:
    c = Client()
    c.open(1)
    c.conn.shutdown()
    (goaway,) = c.read()
    assert goaway == (w.GOAWAY, 0, 0, (1).to_bytes(4, "big") + bytes(4))
    assert c.open(3) == []
    assert c.read() == [(w.RST_STREAM, 0, 3, w.REFUSED_STREAM.to_bytes(4, "big"))]
    assert c.send(frame(w.DATA, w.END_STREAM, 1, grpc_message(b"m"))) == [
        w.Message(1, b"m"), w.HalfClosed(1)]
    c.conn.reply(1, b"r")
    c.conn.finish(1)
    assert c.conn.idle()


def test_a_peer_going_away_closes_once_its_streams_are_done() -> None:
    c = Client()
    c.open(1, end=True)
    assert c.send(frame(w.GOAWAY, 0, 0, bytes(8))) == []
    c.conn.finish(1)
    assert c.send(frame(w.PING, 0, 0, bytes(8))) == [w.Closed(w.NO_ERROR)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 255), st.integers(0, 9),
                          st.binary(max_size=40)), max_size=12), st.binary(max_size=60))
def test_whatever_a_peer_sends_nothing_raises(frames: list, tail: bytes) -> None:
    """Frames of any kind, flags, stream and payload (then any bytes): events or a GOAWAY,
    never an exception (it would end every stream on the connection without a word)."""
    conn = Connection(1000)
    enc = Encoder()
    wire = w.PREFACE + frame(w.HEADERS, w.END_HEADERS, 1, enc.encode([(":path", "/s/M")]))
    for kind, flags, sid, payload in frames:
        wire += frame(kind, flags, sid, payload)
    events = conn.receive(wire + tail)
    conn.reply(1, b"r")
    conn.finish(1)
    conn.data_to_send()
    assert all(not isinstance(e, w.Closed) or e.error != w.INTERNAL_ERROR for e in events)
