"""multipart/form-data bodies (audio uploads): read the small text fields, change one field's
value, and leave every other byte as it came (the file is never decoded or re-encoded).

Bounded for hostile input: the boundary is checked (RFC 2046: 1-70 characters), the parts are
counted, each part's header block is capped, and only small text fields are read; finding
parts is a linear scan with ``bytes.find``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import refusal

MAX_PARTS = 64
MAX_HEADER_BYTES = 8192
MAX_FIELD_BYTES = 65536  # a text field we read (model, stream); larger ones are not read

_BOUNDARY = re.compile(r"""boundary=(?:"([^"]{1,70})"|([0-9A-Za-z'()+_,\-./:=? ]{1,70}))""",
                       re.I)
_PARAM = re.compile(r"""\b(name|filename)\*?=(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))""", re.I)


@dataclass(frozen=True, slots=True)
class FormField:
    name: str
    filename: str | None
    start: int  # the value's first byte in the body
    end: int    # one past its last byte


@dataclass(slots=True)
class Form:
    boundary: bytes
    fields: list[FormField] = field(default_factory=list)
    close: int = 0  # where the closing delimiter starts (new fields go before it)

    def text(self, body: bytes, name: str) -> str | None:
        """A text field's value (the first of that name), or None."""
        for f in self.fields:
            if f.name == name and f.filename is None:
                if f.end - f.start > MAX_FIELD_BYTES:
                    return None
                return body[f.start:f.end].decode("utf-8", "replace")
        return None


def _bad(message: str) -> Exception:
    return refusal(400, f"The multipart/form-data body is malformed: {message}",
                   code="invalid_form", param="content-type")


def boundary_of(content_type: str) -> bytes:
    if not content_type.lower().startswith("multipart/form-data"):
        raise refusal(400, "This endpoint takes a multipart/form-data upload (content-type "
                      f"is {content_type[:80]!r})", code="invalid_content_type",
                      param="content-type")
    m = _BOUNDARY.search(content_type)
    if m is None:
        raise _bad("no boundary (or one that is not 1-70 allowed characters)")
    return (m.group(1) or m.group(2)).rstrip(" ").encode()


def parse_form(body: bytes, content_type: str) -> Form:
    """Every part's name and where its value lies; raises Refusal (400) naming the problem."""
    form = Form(boundary_of(content_type))
    delim = b"--" + form.boundary
    pos = body.find(delim)
    if pos < 0 or (pos > 0 and body[pos - 2:pos] != b"\r\n"):
        raise _bad("the boundary never opens a part")
    while True:
        after = pos + len(delim)
        if body[after:after + 2] == b"--":
            form.close = pos
            return form
        if body[after:after + 2] != b"\r\n":
            raise _bad("a boundary not followed by CRLF")
        if len(form.fields) >= MAX_PARTS:
            raise refusal(400, f"The upload has more than {MAX_PARTS} parts", code="invalid_form",
                          param="content-type")
        head_end = body.find(b"\r\n\r\n", after + 2, after + 2 + MAX_HEADER_BYTES)
        if head_end < 0:
            raise _bad(f"a part's headers are unterminated or over {MAX_HEADER_BYTES} bytes")
        name, filename = _disposition(body[after + 2:head_end])
        start = head_end + 4
        nxt = _delimiter(body, b"\r\n" + delim, start)
        if nxt < 0:
            raise _bad("the closing boundary is missing")
        form.fields.append(FormField(name, filename, start, nxt))
        pos = nxt + 2


def _delimiter(body: bytes, delim: bytes, start: int) -> int:
    """The next delimiter line: the boundary followed by CRLF or ``--`` (the same bytes
    followed by anything else are content)."""
    i = body.find(delim, start)
    while i >= 0 and body[i + len(delim):i + len(delim) + 2] not in (b"\r\n", b"--"):
        i = body.find(delim, i + 1)
    return i


def _disposition(head: bytes) -> tuple[str, str | None]:
    for line in head.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() != b"content-disposition":
            continue
        text = value.decode("utf-8", "replace")
        params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
                  for m in _PARAM.finditer(text)}
        if "name" not in params:
            break
        return params["name"], params.get("filename")
    raise _bad("a part without a Content-Disposition name")


def set_text(body: bytes, form: Form, name: str, value: str) -> bytes:
    """The body with field ``name`` set to ``value`` (added before the closing boundary when
    absent); every other byte unchanged."""
    raw = value.encode()
    for f in form.fields:
        if f.name == name and f.filename is None:
            return body[:f.start] + raw + body[f.end:]
    part = (b"--" + form.boundary + b'\r\nContent-Disposition: form-data; name="' +
            name.encode() + b'"\r\n\r\n' + raw + b"\r\n")
    return body[:form.close] + part + body[form.close:]
