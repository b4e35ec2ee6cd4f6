"""gRPC over HTTP/2, the server's side, sans-IO: bytes in, events out, bytes to send.

Why our own: grpc.aio spent 0.4-0.56 ms of CPU per ext_proc stream on this machine (its
completion-queue thread, callbacks and wake-ups), 4-6x what this module and the asyncio
protocol over it take for the same empty processor (docs/benchmark.md); each request is one or
two such streams. It speaks the part of HTTP/2 (RFC 9113) that gRPC's clients, Envoy's among
them, use towards a server: streams opened by HEADERS (CONTINUATION too), length-prefixed
messages in DATA, answers as headers, messages and trailers, flow control both ways, SETTINGS,
PING, RST_STREAM, GOAWAY; no push, no priorities, no compression of messages. HPACK decoding is
the ``hpack`` library's (Huffman strings, the dynamic table); the few headers we send are
literals that never touch a table, so there is no encoder state to keep.

Every limit is fixed here: frame size, header block size, streams at once, message size (the
service's ``max_message_bytes``). A peer that breaks the protocol gets a GOAWAY naming the error
and the connection ends; a stream that breaks a gRPC rule gets its own status.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from hpack import Decoder, HPACKError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 0x6, 0x7, 0x8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x9, 0xB

S_HEADER_TABLE_SIZE, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, \
    S_MAX_HEADER_LIST_SIZE = 0x1, 0x3, 0x4, 0x5, 0x6

MAX_WINDOW = (1 << 31) - 1
MAX_FRAME = 16384               # HTTP/2's default: larger frames only cost us (one more copy
                                # of a frame held across reads: 0.9 ms per MB, against 0.15)
MAX_HEADER_BLOCK = 64 * 1024    # one request's headers, all CONTINUATIONs included
MAX_STREAMS = 4096              # open at once on one connection
_DECODED_BLOCKS, _DECODED_BLOCK_BYTES = 32, 1024  # header blocks kept decoded (see _decode)
CONNECTION_WINDOW = 1 << 30     # credited back as it arrives: streams bound what is held

# gRPC status codes we answer with.
OK, NOT_FOUND, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL = 0, 5, 8, 12, 13


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return bytes((n >> 16, (n >> 8) & 0xFF, n & 0xFF, kind, flags)) + \
        stream_id.to_bytes(4, "big") + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """A header as a literal never indexed by anyone: no table state on either side."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value


# Every block starts with a dynamic table size update to 0: whatever the peer's
# SETTINGS_HEADER_TABLE_SIZE, its decoder then expects nothing of our (empty) table.
_TABLE_ZERO = b"\x20"
_STATUS_200 = b"\x88"  # :status 200, static table entry 8
_GRPC_TYPE = _literal(b"content-type", b"application/grpc")
RESPONSE_HEADERS = _TABLE_ZERO + _STATUS_200 + _GRPC_TYPE


# gRPC's grpc-message: printable ASCII as is, but '%'; the rest percent-encoded UTF-8.
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if c != 0x25)


def _trailers(status: int, message: str, trailers_only: bool) -> bytes:
    block = RESPONSE_HEADERS if trailers_only else _TABLE_ZERO
    block += _literal(b"grpc-status", str(status).encode())
    if message:  # percent-encoded as gRPC says; bounded so that one literal holds it
        block += _literal(b"grpc-message", quote(message[:80], safe=_MESSAGE_SAFE).encode()[:120])
    return block


@dataclass(slots=True)
class Started:
    """A client opened a stream: its method (the :path) and its headers."""
    stream_id: int
    path: bytes
    headers: dict[bytes, bytes]


@dataclass(slots=True)
class Message:
    stream_id: int
    data: bytes


@dataclass(slots=True)
class HalfClosed:
    """The client sent its last message; the answer is still ours to finish."""
    stream_id: int


@dataclass(slots=True)
class Reset:
    """The client cancelled the stream (RST_STREAM): nothing more is sent on it."""
    stream_id: int


@dataclass(slots=True)
class Refused:
    """A stream broke a gRPC rule (an oversized or compressed message): it was answered with
    a status and reset; whatever serves it stops."""
    stream_id: int


@dataclass(slots=True)
class Closed:
    """The connection is over: the peer broke HTTP/2 (a GOAWAY naming why is queued), or
    went away and has no stream left."""
    error: int


Event = Started | Message | HalfClosed | Reset | Refused | Closed


class _ConnectionError(Exception):
    def __init__(self, code: int, why: str):
        super().__init__(why)
        self.code = code


class _Stream:
    __slots__ = (
        "answering",
        "chunks",
        "pending",
        "recv_window",
        "remote_open",
        "send_window",
        "size",
        "trailers",
        "uncredited",
    )

    def __init__(self, recv_window: int, send_window: int):
        self.chunks: list[bytes] = []  # a message received so far, joined once complete
        self.size = 0
        self.recv_window = recv_window
        self.uncredited = 0           # received, not yet given back
        self.send_window = send_window
        self.pending: list[bytes] = []  # DATA waiting for window
        self.trailers: bytes | None = None  # sent once ``pending`` is empty
        self.answering = False        # our headers are sent
        self.remote_open = True


class Connection:
    """One HTTP/2 connection from a gRPC client. ``receive`` what the socket read, act on the
    events, ``reply``/``finish`` streams, and write ``data_to_send()``; nothing here blocks or
    does I/O."""

    def __init__(self, max_message: int):
        self.max_message = max_message
        # Room for a whole message and a half behind it: credit goes back once consumed.
        self.stream_window = min(MAX_WINDOW, 2 * (max_message + 5))
        self.streams: dict[int, _Stream] = {}
        self.last_id = 0
        self.accepting = True         # False after our GOAWAY: newer streams are refused
        self.closed = False
        self.peer_gone = False        # the peer's GOAWAY: no new streams will come
        self.decoder = Decoder()
        self.decoder.max_header_list_size = MAX_HEADER_BLOCK
        self.decoded: dict[bytes, list[tuple[bytes, bytes]]] = {}  # see _decode
        self.inbuf = bytearray()
        self.preface = False
        self.block: tuple[int, int, bytearray] | None = None  # (stream, flags, fragments)
        self.peer_initial_window = 65535
        self.peer_max_frame = 16384
        self.send_window = 65535
        self.recv_uncredited = 0
        self.blocked: dict[int, None] = {}  # streams waiting for the connection's window
        self.out: list[bytes] = [
            frame(SETTINGS, 0, 0, b"".join(
                key.to_bytes(2, "big") + value.to_bytes(4, "big") for key, value in (
                    (S_MAX_CONCURRENT_STREAMS, MAX_STREAMS),
                    (S_INITIAL_WINDOW_SIZE, self.stream_window),
                    (S_MAX_FRAME_SIZE, MAX_FRAME),
                    (S_MAX_HEADER_LIST_SIZE, MAX_HEADER_BLOCK)))),
            frame(WINDOW_UPDATE, 0, 0, (CONNECTION_WINDOW - 65535).to_bytes(4, "big"))]

    # ------------------------------------------------------------------ sending

    def data_to_send(self) -> bytes:
        out = b"".join(self.out)
        self.out.clear()
        return out

    def reply(self, stream_id: int, message: bytes) -> None:
        """Send one message on the stream (our headers first); dropped if it was reset."""
        st = self.streams.get(stream_id)
        if st is None or st.trailers is not None:
            return
        if not st.answering:
            st.answering = True
            self.out.append(frame(HEADERS, END_HEADERS, stream_id, RESPONSE_HEADERS))
        st.pending.append(len(message).to_bytes(5, "big") + message)
        self._flush(stream_id, st)

    def finish(self, stream_id: int, status: int = OK, message: str = "") -> None:
        """End the stream with a gRPC status (after whatever is still waiting for window)."""
        st = self.streams.get(stream_id)
        if st is None or st.trailers is not None:
            return
        st.trailers = _trailers(status, message, not st.answering)
        st.answering = True
        self._flush(stream_id, st)

    def shutdown(self) -> None:
        """Graceful: no stream after the last one seen; those open finish."""
        if self.accepting and not self.closed:
            self.accepting = False
            self.out.append(frame(GOAWAY, 0, 0, self.last_id.to_bytes(4, "big") +
                                  NO_ERROR.to_bytes(4, "big")))

    def idle(self) -> bool:
        return not self.streams

    def _flush(self, stream_id: int, st: _Stream) -> None:
        pending = st.pending
        while pending:
            chunk = pending[0]
            room = min(self.send_window, st.send_window, self.peer_max_frame)
            if room <= 0:
                if self.send_window <= 0:
                    self.blocked[stream_id] = None
                return
            if len(chunk) <= room:
                pending.pop(0)
                n = len(chunk)
            else:
                pending[0] = chunk[room:]
                chunk, n = chunk[:room], room
            self.send_window -= n
            st.send_window -= n
            self.out.append(frame(DATA, 0, stream_id, chunk))
        if st.trailers is not None:  # sent, the stream is over on our side: forgotten
            self.out.append(frame(HEADERS, END_HEADERS | END_STREAM, stream_id, st.trailers))
            if st.remote_open:  # answered before the client was done: it stops sending
                self.out.append(frame(RST_STREAM, 0, stream_id, NO_ERROR.to_bytes(4, "big")))
            self._forget(stream_id)

    def _forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        self.blocked.pop(stream_id, None)

    def consumed(self, stream_id: int) -> None:
        """The stream's messages so far were taken: give their window back once half of it
        is used (a message still waiting holds the client back: backpressure)."""
        st = self.streams.get(stream_id)
        if st is not None and st.remote_open and st.uncredited * 2 >= self.stream_window:
            self.out.append(frame(WINDOW_UPDATE, 0, stream_id, st.uncredited.to_bytes(4, "big")))
            st.recv_window += st.uncredited
            st.uncredited = 0

    # ------------------------------------------------------------------ receiving

    def receive(self, data: bytes) -> list[Event]:
        if self.closed:
            return []
        events: list[Event] = []
        buf = self.inbuf
        buf += data
        try:
            if not self.preface:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buf)):
                        raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 preface")
                    return events
                if buf[:len(PREFACE)] != PREFACE:
                    raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 preface")
                del buf[:len(PREFACE)]
                self.preface = True
            pos, end = 0, len(buf)
            view = memoryview(buf)
            try:
                while end - pos >= 9:
                    length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
                    if length > MAX_FRAME:
                        raise _ConnectionError(FRAME_SIZE_ERROR, "frame larger than allowed")
                    if end - pos - 9 < length:
                        break
                    kind, flags = buf[pos + 3], buf[pos + 4]
                    stream_id = int.from_bytes(view[pos + 5:pos + 9], "big") & MAX_WINDOW
                    payload = bytes(view[pos + 9:pos + 9 + length])
                    pos += 9 + length
                    self._frame(kind, flags, stream_id, payload, events)
            finally:
                view.release()
            del buf[:pos]
        except _ConnectionError as exc:
            self._fail(exc.code, str(exc), events)
            return events
        except Exception as exc:  # a case this code did not foresee: the peer is told, we go on
            self._fail(INTERNAL_ERROR, exc.__class__.__name__, events)
            return events
        if self.recv_uncredited * 2 >= CONNECTION_WINDOW:
            self.out.append(frame(WINDOW_UPDATE, 0, 0, self.recv_uncredited.to_bytes(4, "big")))
            self.recv_uncredited = 0
        if self.peer_gone and not self.streams:
            self.closed = True
            events.append(Closed(NO_ERROR))
        return events

    def _fail(self, code: int, why: str, events: list[Event]) -> None:
        self.out.append(frame(GOAWAY, 0, 0, self.last_id.to_bytes(4, "big") +
                              code.to_bytes(4, "big") + why.encode()[:200]))
        self.closed = True
        for stream_id in list(self.streams):
            events.append(Reset(stream_id))
        self.streams.clear()
        self.blocked.clear()
        events.append(Closed(code))

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes,
               events: list[Event]) -> None:
        if self.block is not None and kind != CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR, "headers interrupted")
        if kind == DATA:
            self._data(flags, stream_id, payload, events)
        elif kind == HEADERS:
            if stream_id == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
            if flags & PADDED:
                payload = _unpad(payload)
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            self.block = (stream_id, flags, bytearray(payload))
            if flags & END_HEADERS:
                self._headers(events)
            elif len(payload) > MAX_HEADER_BLOCK:
                raise _ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
        elif kind == CONTINUATION:
            if self.block is None or self.block[0] != stream_id:
                raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION out of place")
            self.block[2].extend(payload)
            if len(self.block[2]) > MAX_HEADER_BLOCK:
                raise _ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
            if flags & END_HEADERS:
                self._headers(events)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == SETTINGS:
            self._settings(flags, stream_id, payload)
        elif kind == PING:
            if len(payload) != 8 or stream_id:
                raise _ConnectionError(FRAME_SIZE_ERROR if len(payload) != 8 else
                                       PROTOCOL_ERROR, "bad PING")
            if not flags & ACK:
                self.out.append(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            if len(payload) != 4 or stream_id == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "bad RST_STREAM")
            if self.streams.pop(stream_id, None) is not None:
                self.blocked.pop(stream_id, None)
                events.append(Reset(stream_id))
        elif kind == GOAWAY:
            self.peer_gone = True
        elif kind == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "a client cannot push")
        # PRIORITY and unknown kinds: ignored, as the protocol says

    def _data(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)
        self.recv_uncredited += size
        if flags & PADDED:
            payload = _unpad(payload)
        st = self.streams.get(stream_id)
        if st is None or not st.remote_open:
            if stream_id > self.last_id:
                raise _ConnectionError(PROTOCOL_ERROR, "DATA on an idle stream")
            return  # a stream we ended or refused: late data, dropped
        st.recv_window -= size
        st.uncredited += size
        if st.recv_window < 0:
            raise _ConnectionError(FLOW_CONTROL_ERROR, "stream window exceeded")
        if not st.chunks and len(payload) >= 5 and not payload[0] and \
                len(payload) == 5 + int.from_bytes(payload[1:5], "big"):
            if len(payload) - 5 > self.max_message:  # one whole message: no copy (the usual)
                self._refuse(stream_id, RESOURCE_EXHAUSTED, "message larger than allowed", events)
                return
            events.append(Message(stream_id, payload[5:]))
        elif payload:
            # Pieces kept apart and joined once the message is whole (the one copy of it):
            # appending to one buffer re-copied it as it grew, 1.3 ms for 1 MB in 16 KiB frames.
            st.chunks.append(payload)
            st.size += len(payload)
            while st.size >= 5:
                if len(st.chunks[0]) < 5:
                    st.chunks = [b"".join(st.chunks)]
                head = st.chunks[0]
                if head[0]:
                    self._refuse(stream_id, UNIMPLEMENTED, "compressed messages are not taken",
                                 events)
                    return
                n = int.from_bytes(head[1:5], "big")
                if n > self.max_message:
                    self._refuse(stream_id, RESOURCE_EXHAUSTED, "message larger than allowed",
                                 events)
                    return
                extra = st.size - 5 - n
                if extra < 0:
                    break
                chunks, st.chunks = st.chunks, []
                if extra:  # the next message begins in the last piece
                    last = chunks[-1]
                    chunks[-1], rest = last[:len(last) - extra], last[len(last) - extra:]
                    st.chunks.append(rest)
                st.size = extra
                chunks[0] = chunks[0][5:]
                events.append(Message(stream_id, chunks[0] if len(chunks) == 1
                                      else b"".join(chunks)))
        if flags & END_STREAM:
            self._half_close(stream_id, st, events)

    def _half_close(self, stream_id: int, st: _Stream, events: list[Event]) -> None:
        st.remote_open = False
        if st.chunks:  # a message cut short
            self._refuse(stream_id, INTERNAL, "stream ended inside a message", events)
            return
        events.append(HalfClosed(stream_id))

    def _refuse(self, stream_id: int, status: int, why: str, events: list[Event]) -> None:
        st = self.streams[stream_id]
        st.pending.clear()
        st.trailers = None
        self.finish(stream_id, status, why)  # (sent at once: nothing waits; then forgotten)
        events.append(Refused(stream_id))

    def _headers(self, events: list[Event]) -> None:
        assert self.block is not None
        stream_id, flags, block = self.block
        self.block = None
        try:
            headers = self._decode(bytes(block))
        except HPACKError as exc:
            raise _ConnectionError(COMPRESSION_ERROR, f"headers: {exc.__class__.__name__}"
                                   ) from None
        st = self.streams.get(stream_id)
        if st is not None:  # trailers from the client: its last word
            if not flags & END_STREAM:
                raise _ConnectionError(PROTOCOL_ERROR, "second HEADERS without END_STREAM")
            if st.remote_open:
                self._half_close(stream_id, st, events)
            return
        if stream_id <= self.last_id or not stream_id & 1:
            if stream_id & 1:
                return  # (the trailers of a stream we already ended)
            raise _ConnectionError(PROTOCOL_ERROR, "stream id out of order")
        self.last_id = stream_id
        if not self.accepting or self.peer_gone or len(self.streams) >= MAX_STREAMS:
            self.out.append(frame(RST_STREAM, 0, stream_id, REFUSED_STREAM.to_bytes(4, "big")))
            return
        st = self.streams[stream_id] = _Stream(self.stream_window, self.peer_initial_window)
        fields = dict(headers)
        events.append(Started(stream_id, fields.get(b":path", b""), fields))
        if flags & END_STREAM:
            self._half_close(stream_id, st, events)

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """A header block's fields. Envoy opens every stream with the same bytes (its constant
        headers indexed, the path a literal), and decoding them afresh took ~10% of the
        service's CPU: a block decoded before is taken as it was while the dynamic table it
        was decoded against is unchanged; a block that changes the table empties the cache."""
        known = self.decoded.get(block)
        if known is not None:
            return known
        table = self.decoder.header_table

        def state() -> tuple[int, int, object]:  # (the newest entry compared by identity)
            entries = table.dynamic_entries
            return table.maxsize, len(entries), entries[0] if entries else None

        before = state()
        headers = self.decoder.decode(block, raw=True)
        after = state()
        if after[:2] == before[:2] and after[2] is before[2]:
            if len(self.decoded) < _DECODED_BLOCKS and len(block) <= _DECODED_BLOCK_BYTES:
                self.decoded[block] = headers
        else:
            self.decoded.clear()
        return headers

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        inc = int.from_bytes(payload, "big") & MAX_WINDOW
        if stream_id == 0:
            if inc == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "zero WINDOW_UPDATE")
            self.send_window += inc
            if self.send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window overflow")
            blocked, self.blocked = self.blocked, {}
            for sid in blocked:
                st = self.streams.get(sid)
                if st is not None:
                    self._flush(sid, st)
            return
        st = self.streams.get(stream_id)
        if st is None or inc == 0:
            return
        st.send_window += inc
        if st.send_window > MAX_WINDOW:
            raise _ConnectionError(FLOW_CONTROL_ERROR, "stream window overflow")
        self._flush(stream_id, st)

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "bad SETTINGS")
        for i in range(0, len(payload), 6):
            key = int.from_bytes(payload[i:i + 2], "big")
            value = int.from_bytes(payload[i + 2:i + 6], "big")
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "initial window too large")
                delta, self.peer_initial_window = value - self.peer_initial_window, value
                for st in self.streams.values():
                    st.send_window += delta
            elif key == S_MAX_FRAME_SIZE:
                if not 16384 <= value < 1 << 24:
                    raise _ConnectionError(PROTOCOL_ERROR, "bad max frame size")
                self.peer_max_frame = value
        self.out.append(frame(SETTINGS, ACK, 0))
        for sid, st in list(self.streams.items()):  # a larger window may free what waits
            if st.pending:
                self._flush(sid, st)


def _unpad(payload: bytes) -> bytes:
    if not payload or payload[0] >= len(payload):
        raise _ConnectionError(PROTOCOL_ERROR, "bad padding")
    return payload[1:len(payload) - payload[0]]
