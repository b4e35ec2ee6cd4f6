"""Audio formats: what the bytes are (magic numbers), what a MIME type says, and transcoding."""

from __future__ import annotations

import io

MIME_FORMATS = {
    "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav",
    "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/mpeg3": "mp3",
    "audio/flac": "flac", "audio/x-flac": "flac",
    "audio/ogg": "ogg", "audio/opus": "ogg", "audio/vorbis": "ogg",
    "audio/mp4": "m4a", "audio/m4a": "m4a", "audio/x-m4a": "m4a", "audio/aac": "aac",
    "audio/webm": "webm",
}
FORMAT_MIME = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg",
               "m4a": "audio/mp4", "aac": "audio/aac", "webm": "audio/webm"}
# What libsndfile (via soundfile) can decode; m4a/aac/webm need ffmpeg, which we do not ship.
DECODABLE = frozenset({"wav", "mp3", "flac", "ogg"})


def sniff(head: bytes) -> str | None:
    """Audio format from the first bytes, or None when unknown."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0
                              and head[1] & 0x06 != 0):
        return "mp3"
    if head[4:8] == b"ftyp":
        return "m4a"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if len(head) > 1 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:
        return "aac"
    return None


def normalise_format(fmt: str) -> str:
    f = fmt.lower().strip().lstrip(".")
    return {"wave": "wav", "mpeg": "mp3", "oga": "ogg", "opus": "ogg", "mp4": "m4a"}.get(f, f)


class TranscodeError(Exception):
    pass


def transcode(data: bytes, to: str) -> bytes:
    """Decode any libsndfile format and encode as ``to`` (wav: 16-bit PCM)."""
    import soundfile  # imported lazily: only conversions pay for it

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError/RuntimeError on bad input
        raise TranscodeError(f"cannot decode the audio: {exc}") from None
    out = io.BytesIO()
    if to == "wav":
        soundfile.write(out, samples, rate, format="WAV", subtype="PCM_16")
    elif to == "mp3":
        soundfile.write(out, samples, rate, format="MP3")
    elif to == "flac":
        soundfile.write(out, samples, rate, format="FLAC")
    else:
        raise TranscodeError(f"cannot encode {to}")
    return out.getvalue()
