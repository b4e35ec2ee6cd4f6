"""Multimodal content parts: accept every common shape, hand each backend the shape it takes.

Three pure steps, no I/O:
- ``inspect_parts`` (route stage): parse every part of every message into one form, validate it
  (400s name the exact place, e.g. ``messages[2].content[1].input_audio.data``) and summarise
  the distinct part signatures, which travel to the attempt stage in Envoy metadata.
- ``plan`` says, for a backend profile and a signature: keep, reshape, fetch, transcode or
  refuse. The route stage drops candidates that would refuse; the attempt stage decides from the
  signatures alone whether the body needs touching at all.
- ``convert_body`` (attempt stage) rewrites the parts that need it, given fetched bytes.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from .audio import (
    DECODABLE,
    FORMAT_MIME,
    MIME_FORMATS,
    AudioTooLarge,
    TranscodeError,
    normalise_format,
    sniff,
    transcode,
)
from .errors import Refusal, error_reply

Kind = Literal["text", "image", "audio", "video", "file", "other"]
Action = Literal["keep", "reshape", "fetch", "transcode", "refuse"]

SHAPES = frozenset({
    "text", "input_text", "image_url", "image_url_string", "input_image", "hf_image",
    "untyped_image_url", "input_audio", "audio_url", "hf_audio", "video_url", "hf_video", "file",
})


@dataclass(frozen=True, slots=True)
class Profile:
    """What one backend accepts natively (docs/content-parts.md)."""

    accepts: frozenset[str]
    audio_formats: tuple[str, ...] = ()     # input_audio formats; empty = any
    fetches_urls: bool = True               # downloads http(s) URLs itself
    image_mimes: tuple[str, ...] = ()       # data-URL image types; empty = any
    keeps_detail: bool = True
    metadata: str = "accept"                # with_store: `metadata` only with `store: true`
    check_urls: bool = True                 # URLs it fetches itself pass our fetch policy


PRESETS: dict[str, Profile] = {
    "openai": Profile(frozenset({"text", "image_url", "input_audio", "file"}), ("wav", "mp3"),
                      metadata="with_store"),
    # (vLLM 0.32 refuses input_text and parts without a type as a message's first part and
    # input_image without "detail": we send it those as text and image_url.)
    "vllm": Profile(frozenset({"text", "image_url", "input_audio", "audio_url", "video_url"}),
                    ("wav", "mp3", "flac", "ogg"), keeps_detail=False),
    "sglang": Profile(frozenset({"text", "image_url", "input_audio", "audio_url", "video_url"}),
                      ("wav", "mp3")),
    "llamacpp": Profile(frozenset({"text", "image_url", "input_audio"}), ("wav", "mp3")),
    "ollama": Profile(frozenset({"text", "image_url", "image_url_string"}), (),
                      fetches_urls=False, image_mimes=("jpeg", "png", "webp"),
                      keeps_detail=False),
}
PRESETS["azure"] = PRESETS["openai"]


@dataclass(frozen=True, slots=True)
class Sig:
    """What matters about a part for deciding its fate, independent of its bytes."""

    shape: str
    kind: Kind
    source: str = ""      # data | http | https | other | "" (no URL)
    fmt: str = ""         # audio format (from bytes, else declared) or image subtype
    mismatch: bool = False  # declared audio format differs from the bytes

    def encode(self) -> list[Any]:
        return [self.shape, self.kind, self.source, self.fmt, self.mismatch]

    @classmethod
    def decode(cls, raw: list[Any]) -> Sig:
        shape, kind, source, fmt, mismatch = raw
        return cls(str(shape), kind, str(source), str(fmt), bool(mismatch))


@dataclass(slots=True)
class Part:
    path: str
    msg: int
    idx: int
    sig: Sig
    text: str | None = None
    url: str | None = None
    b64: str | None = None        # base64 payload (input_audio data, or a data URL's payload)
    mime: str | None = None
    detail: str | None = None


@dataclass(slots=True)
class PartsReport:
    parts: list[Part] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def sigs(self) -> list[Sig]:
        return list(dict.fromkeys(p.sig for p in self.parts if p.sig.kind != "text"
                                  or p.sig.shape != "text"))


def profile_for(preset: str, override: Any) -> Profile:
    """A preset's profile with the config's overrides applied."""
    base = PRESETS[preset]
    return Profile(
        frozenset(override.accepts) if override.accepts is not None else base.accepts,
        tuple(override.audio_formats) if override.audio_formats is not None
        else base.audio_formats,
        override.fetches_urls if override.fetches_urls is not None else base.fetches_urls,
        tuple(override.image_mimes) if override.image_mimes is not None else base.image_mimes,
        override.keeps_detail if override.keeps_detail is not None else base.keeps_detail,
        override.metadata if override.metadata is not None else base.metadata,
        override.check_urls if override.check_urls is not None else base.check_urls,
    )


def _bad_type(param: str, expected: str, got: Any) -> Refusal:
    return Refusal(error_reply(
        400, f"Invalid type for '{param}': expected {expected}, got {_tname(got)}",
        code="invalid_type", param=param))


def _tname(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null", int: "a number", float: "a number"}.get(type(v), type(v).__name__)


_B64_LENIENT = re.compile(r"[A-Za-z0-9+/=\s]*")
_MIME = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")


_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _strict_base64(b64: str) -> bool:
    """Strict base64 (the alphabet, padding only at the end, whole quanta) without decoding:
    5x faster than ``a2b_base64(strict_mode=True)`` on a multi-MB part (one C pass)."""
    if not b64.isascii() or len(b64) % 4:
        return False
    raw = b64.encode("ascii")
    rest = raw.translate(None, _B64_ALPHABET)  # what is not in the alphabet
    if not rest:
        return True
    pad = len(raw) - len(raw.rstrip(b"="))
    return pad <= 2 and rest == b"=" * pad


def check_base64(b64: str, param: str) -> None:
    if _strict_base64(b64):
        return
    try:
        if _B64_LENIENT.fullmatch(b64) and base64.b64decode(re.sub(r"\s", "", b64), validate=True):
            return
    except (binascii.Error, ValueError):
        pass
    raise Refusal(error_reply(400, f"'{param}' is not valid base64", code="invalid_base64",
                                param=param))


def head_bytes(b64: str) -> bytes:
    try:
        return binascii.a2b_base64(b64[:64].strip())
    except (binascii.Error, ValueError):
        return b""


def parse_data_url(url: str, param: str, validate: bool = True) -> tuple[str, str]:
    """``data:<mime>;base64,<payload>`` -> (mime, payload), validating the payload."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise Refusal(error_reply(
            400, f"'{param}' is not a readable data URL: expected data:<type>;base64,<data>",
            code="invalid_data_url", param=param))
    mime = head[5:-7].split(";", 1)[0].strip().lower()
    if not _MIME.fullmatch(mime):
        raise Refusal(error_reply(
            400, f"'{param}' is not a readable data URL: its media type is not type/subtype",
            code="invalid_data_url", param=param))
    if validate:
        check_base64(payload, param)
    return mime, payload


def _source(url: str) -> str:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    return scheme if scheme in ("data", "http", "https") else "other"


def _get_url(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        url = value.get("url")
        if isinstance(url, str):
            return url
        raise _bad_type(f"{param}.url", "a string", url)
    raise _bad_type(param, "an object with a url", value)


def _media_part(path: str, i: int, j: int, kind: Kind, shape: str, url: str, url_param: str,
                declared: str | None = None, detail: str | None = None,
                validate: bool = True) -> tuple[Part, str | None]:
    source = _source(url)
    part = Part(path, i, j, Sig(shape, kind, source), url=url, detail=detail)
    warning = None
    if source == "data":
        mime, payload = parse_data_url(url, url_param, validate)
        part.b64, part.mime = payload, mime
        fmt, mismatch = mime.split("/", 1)[-1], False
        if kind == "audio":
            declared_fmt = MIME_FORMATS.get(mime) or (normalise_format(declared) if declared
                                                      else "")
            sniffed = sniff(head_bytes(payload))
            fmt = sniffed or declared_fmt
            mismatch = bool(sniffed and declared_fmt and sniffed != declared_fmt)
            if mismatch:
                warning = f"{url_param}: declared {declared_fmt}, the bytes are {sniffed}"
        part.sig = Sig(shape, kind, source, fmt, mismatch)
    return part, warning


def _parse_part(raw: Any, path: str, i: int, j: int, validate: bool = True
                ) -> tuple[Part, str | None]:
    if not isinstance(raw, dict):
        raise _bad_type(path, "an object", raw)
    ptype = raw.get("type")
    if ptype is None:
        for key in ("text", "image_url", "input_audio", "audio_url", "video_url"):
            if key in raw:
                ptype = key
                break
        untyped = True
    else:
        untyped = False
    if not isinstance(ptype, str):
        raise _bad_type(f"{path}.type", "a string", ptype)
    if ptype in ("text", "input_text"):
        text = raw.get("text")
        if not isinstance(text, str):
            raise _bad_type(f"{path}.text", "a string", text)
        shape = "untyped_text" if untyped else ptype
        return Part(path, i, j, Sig(shape, "text"), text=text), None
    if ptype == "image_url":
        value = raw.get("image_url")
        shape = ("untyped_image_url" if untyped else
                 "image_url_string" if isinstance(value, str) else "image_url")
        url = _get_url(value, f"{path}.image_url")
        detail = value.get("detail") if isinstance(value, dict) else raw.get("detail")
        url_param = f"{path}.image_url" + ("" if isinstance(value, str) else ".url")
        return _media_part(path, i, j, "image", shape, url, url_param,
                           detail=detail if isinstance(detail, str) else None,
                           validate=validate)
    if ptype == "input_image":
        value = raw.get("image_url")
        if not isinstance(value, str):
            raise _bad_type(f"{path}.image_url", "a string", value)
        detail = raw.get("detail")
        return _media_part(path, i, j, "image", "input_image", value, f"{path}.image_url",
                           detail=detail if isinstance(detail, str) else None,
                           validate=validate)
    if ptype in ("image", "audio", "video"):
        key = "url" if "url" in raw else ptype
        url = raw.get(key)
        if not isinstance(url, str):
            raise _bad_type(f"{path}.{key}", "a string (URL)", url)
        return _media_part(path, i, j, ptype, f"hf_{ptype}", url, f"{path}.{key}",
                           validate=validate)  # type: ignore[arg-type]
    if ptype == "input_audio":
        value = raw.get("input_audio")
        if not isinstance(value, dict):
            raise _bad_type(f"{path}.input_audio", "an object", value)
        data, fmt = value.get("data"), value.get("format")
        if not isinstance(data, str):
            raise _bad_type(f"{path}.input_audio.data", "a string (base64)", data)
        if not isinstance(fmt, str):
            raise _bad_type(f"{path}.input_audio.format", "a string", fmt)
        shape = "untyped_input_audio" if untyped else "input_audio"
        if data.startswith("data:"):
            _, data = parse_data_url(data, f"{path}.input_audio.data", validate)
            shape = "input_audio_data_url"
        elif validate:
            check_base64(data, f"{path}.input_audio.data")
        declared = normalise_format(fmt)
        if declared not in FORMAT_MIME:
            param = f"{path}.input_audio.format"
            raise Refusal(error_reply(
                400, f"'{param}': unknown audio format {fmt[:20]!r}; expected one of "
                f"{', '.join(FORMAT_MIME)}", code="invalid_value", param=param))
        sniffed = sniff(head_bytes(data))
        mismatch = bool(sniffed and sniffed != declared)
        warning = (f"{path}.input_audio.format: declared {declared}, the bytes are {sniffed}"
                   if mismatch else None)
        return Part(path, i, j, Sig(shape, "audio", "data", sniffed or declared, mismatch),
                    b64=data), warning
    if ptype in ("audio_url", "video_url"):
        kind: Kind = "audio" if ptype == "audio_url" else "video"
        value = raw.get(ptype)
        url = _get_url(value, f"{path}.{ptype}")
        url_param = f"{path}.{ptype}" + ("" if isinstance(value, str) else ".url")
        shape = f"untyped_{ptype}" if untyped else ptype if isinstance(value, dict) else \
            f"{ptype}_string"
        return _media_part(path, i, j, kind, shape, url, url_param, validate=validate)
    if ptype == "file":
        return Part(path, i, j, Sig("file", "file")), None
    return Part(path, i, j, Sig(ptype, "other")), None


def inspect_parts(data: dict[str, Any], max_part_bytes: int | None = None,
                  validate: bool = True, origins: Mapping[tuple[int, int], Any] | None = None
                  ) -> PartsReport:
    """Parse and validate every content part; raise Refusal with a 400 naming the place
    (413 for an inline part over ``max_part_bytes``). The attempt stage passes
    ``validate=False``: the route stage already checked every payload of this body.
    ``origins``: for a chat view of another API's body, where each part came from (an
    ``endpoints.Origin``): parts and errors name the client's own fields."""
    if origins:
        return _inspect_view(data, max_part_bytes, validate, origins)
    report = PartsReport()
    messages = data.get("messages")
    if messages is None:
        return report
    if not isinstance(messages, list):
        raise _bad_type("messages", "an array", messages)
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _bad_type(f"messages[{i}]", "an object", msg)
        content = msg.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _bad_type(f"messages[{i}].content", "a string or an array of parts", content)
        for j, raw in enumerate(content):
            part, warning = _parse_part(raw, f"messages[{i}].content[{j}]", i, j, validate)
            if max_part_bytes and part.b64 is not None and len(part.b64) > max_part_bytes:
                raise Refusal(error_reply(
                    413, f"{part.path}: the inline {part.sig.kind} is {len(part.b64)} bytes of "
                    f"base64, over the {max_part_bytes}-byte limit", code="part_too_large",
                    param=part.path))
            report.parts.append(part)
            if warning:
                report.warnings.append(warning)
    return report



def _inspect_view(data: dict[str, Any], max_part_bytes: int | None, validate: bool,
                  origins: Mapping[tuple[int, int], Any]) -> PartsReport:
    """``inspect_parts`` for a chat view: each part and each error renamed to its origin."""
    try:
        report = inspect_parts(data, max_part_bytes, validate)
    except Refusal as refused:
        raise _renamed(refused, origins) from None
    for part in report.parts:
        origin = origins.get((part.msg, part.idx))
        if origin is not None:
            part.path = origin.path
    report.warnings = [_rename_text(w, origins) for w in report.warnings]
    return report


_VIEW_PATH = re.compile(r"messages\[(\d+)\]\.content\[(\d+)\]((?:\.[a-z_]+)*)")


def _rename_text(text: str, origins: Mapping[tuple[int, int], Any]) -> str:
    def one(m: re.Match[str]) -> str:
        origin = origins.get((int(m.group(1)), int(m.group(2))))
        if origin is None:
            return m.group(0)
        return (origin.leaf or origin.path) if m.group(3) else origin.path
    return _VIEW_PATH.sub(one, text)


def _renamed(refused: Refusal, origins: Mapping[tuple[int, int], Any]) -> Refusal:
    """The same refusal, naming the client's fields instead of the chat view's."""
    err = orjson.loads(refused.reply.body).get("error", {})
    for key in ("message", "param"):
        if isinstance(err.get(key), str):
            err[key] = _rename_text(err[key], origins)
    status = refused.reply.status
    return Refusal(error_reply(status, err.pop("message", ""), code=err.pop("code", None),
                               param=err.pop("param", None), type=err.pop("type", "invalid_"
                               "request_error"), extra=err or None))

def plan(p: Profile, s: Sig) -> Action:
    """What to do with a part of signature ``s`` for a backend with profile ``p``."""
    accepted = s.shape in p.accepts
    if s.kind == "text":
        return "keep" if accepted else "reshape"
    if s.kind == "other":
        return "keep"
    if s.kind == "file":
        return "keep" if accepted else "refuse"
    if s.source not in ("data", "http", "https"):
        return "refuse"
    remote = s.source in ("http", "https")
    if s.kind == "image":
        if "image_url" not in p.accepts and "image_url_string" not in p.accepts:
            return "refuse"
        if remote and not p.fetches_urls:
            return "fetch"
        if not remote and p.image_mimes and s.fmt not in p.image_mimes:
            return "refuse"
        return "keep" if accepted else "reshape"
    if s.kind == "video":
        if "video_url" not in p.accepts:
            return "refuse"
        return "keep" if s.shape == "video_url" else "reshape"
    # audio
    takes_url, takes_input = "audio_url" in p.accepts, "input_audio" in p.accepts
    if not (takes_url or takes_input):
        return "refuse"
    if remote:
        return ("keep" if s.shape == "audio_url" else "reshape") if takes_url and \
            p.fetches_urls else "fetch"
    if p.audio_formats and s.fmt not in p.audio_formats:
        return "transcode" if s.fmt in DECODABLE else "refuse"
    if s.mismatch:
        return "reshape"
    return "keep" if accepted else "reshape"


def needs_change(p: Profile, sigs: list[Sig]) -> bool:
    return any(plan(p, s) != "keep" for s in sigs)


def refused(p: Profile, sigs: list[Sig]) -> Sig | None:
    return next((s for s in sigs if plan(p, s) == "refuse"), None)


def describe(s: Sig) -> str:
    extra = f" ({s.fmt})" if s.fmt else ""
    src = f" from a {s.source} URL" if s.source in ("http", "https") else ""
    return f"{s.shape} {s.kind} part{extra}{src}"


# ---------------------------------------------------------------- attempt stage: conversion

def _emit_image(p: Profile, url: str, detail: str | None) -> dict[str, Any]:
    inner: dict[str, Any] = {"url": url}
    if detail and p.keeps_detail:
        inner["detail"] = detail
    return {"type": "image_url", "image_url": inner}


def _emit_audio(p: Profile, b64: str, fmt: str) -> dict[str, Any]:
    if "input_audio" in p.accepts:
        return {"type": "input_audio", "input_audio": {"data": b64, "format": fmt}}
    return {"type": "audio_url",
            "audio_url": {"url": f"data:{FORMAT_MIME.get(fmt, 'audio/' + fmt)};base64,{b64}"}}


def fetch_targets(p: Profile, report: PartsReport) -> list[Part]:
    return [part for part in report.parts if plan(p, part.sig) == "fetch"]


def transcodes(p: Profile, report: PartsReport) -> bool:
    """Whether converting for ``p`` may decode audio (long: done off the event loop)."""
    return any(plan(p, part.sig) in ("transcode", "fetch") and part.sig.kind == "audio"
               for part in report.parts)


def convert_body(data: dict[str, Any], report: PartsReport, p: Profile,
                 fetched: dict[str, tuple[str, bytes]],
                 max_decoded_audio_bytes: int = 24 * 1024 * 1024) -> int:
    """Rewrite parts in place for profile ``p``; ``fetched`` maps URL -> (mime, bytes).

    Returns the number of parts changed. Raises Refusal with a 400 when a part cannot be
    made acceptable (undecodable audio, a fetched file of the wrong type), a 413 when audio
    would decode to more than ``max_decoded_audio_bytes``.
    """
    changed = 0
    for part in report.parts:
        action = plan(p, part.sig)
        if action == "keep":
            continue
        s = part.sig
        new: dict[str, Any]
        if action == "refuse":  # the route stage filters these; defend anyway
            raise Refusal(error_reply(400, f"{part.path}: {describe(s)} is not accepted "
                                           "by this backend", code="unsupported_content",
                                           param=part.path))
        if action == "fetch":
            assert part.url is not None
            mime, raw = fetched[part.url]
            b64 = base64.b64encode(raw).decode()
            if s.kind == "image":
                if not mime.startswith("image/"):
                    raise Refusal(error_reply(
                        400, f"{part.path}: {part.url} is {mime or 'untyped'}, not an image",
                        code="invalid_content_type", param=part.path))
                sub = mime.split("/", 1)[1]
                if p.image_mimes and sub not in p.image_mimes:
                    raise Refusal(error_reply(
                        400, f"{part.path}: image type {mime} is not accepted by this backend "
                        f"(accepts {', '.join(p.image_mimes)})", code="unsupported_content",
                        param=part.path))
                new = _emit_image(p, f"data:{mime};base64,{b64}", part.detail)
            else:
                fmt = sniff(raw[:16]) or MIME_FORMATS.get(mime, "")
                if not fmt:
                    raise Refusal(error_reply(
                        400, f"{part.path}: {part.url} is not recognisable audio ({mime})",
                        code="invalid_content_type", param=part.path))
                if p.audio_formats and fmt not in p.audio_formats:
                    raw, fmt = _transcode(part.path, raw, fmt, p, max_decoded_audio_bytes)
                    b64 = base64.b64encode(raw).decode()
                new = _emit_audio(p, b64, fmt)
        elif s.kind == "text":
            new = {"type": "text", "text": part.text}
        elif s.kind == "image":
            assert part.url is not None
            new = _emit_image(p, part.url, part.detail)
        elif s.kind == "video":
            new = {"type": "video_url", "video_url": {"url": part.url}}
        elif s.kind == "audio" and s.source in ("http", "https"):
            new = {"type": "audio_url", "audio_url": {"url": part.url}}
        else:  # audio held inline
            assert part.b64 is not None
            b64, fmt = part.b64, s.fmt
            if action == "transcode":
                raw, fmt = _transcode(part.path, base64.b64decode(b64), fmt, p,
                                      max_decoded_audio_bytes)
                b64 = base64.b64encode(raw).decode()
            new = _emit_audio(p, b64, fmt)
        data["messages"][part.msg]["content"][part.idx] = new
        changed += 1
    return changed


def _transcode(path: str, raw: bytes, fmt: str, p: Profile, max_decoded_bytes: int
               ) -> tuple[bytes, str]:
    target = "wav" if "wav" in p.audio_formats else p.audio_formats[0]
    if fmt not in DECODABLE:
        raise Refusal(error_reply(
            400, f"{path}: {fmt} audio cannot be converted here; this backend accepts "
            f"{', '.join(p.audio_formats)}", code="unsupported_audio_format", param=path))
    try:
        return transcode(raw, target, max_decoded_bytes), target
    except AudioTooLarge as exc:
        raise Refusal(error_reply(413, f"{path}: {exc}", code="audio_too_large",
                                       param=path)) from None
    except TranscodeError as exc:
        raise Refusal(error_reply(400, f"{path}: {exc}", code="invalid_audio",
                                       param=path)) from None
