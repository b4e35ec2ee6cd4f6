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


class AudioTooLarge(TranscodeError):
    """Decoded, the audio would be over the budget (a small compressed file can decode to
    gigabytes: 20 minutes of silence is 300 KB of FLAC)."""


def transcode(data: bytes, to: str, max_decoded_bytes: int) -> bytes:
    """Decode any libsndfile format and encode as ``to`` (wav: 16-bit PCM), decoding at most
    ``max_decoded_bytes`` of 16-bit samples: the header's length is checked before decoding,
    and the read is bounded in case the header understates it. CPU-bound and long for long
    audio: callers run it off the event loop (libsndfile releases the GIL)."""
    import soundfile  # imported lazily: only conversions pay for it

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            per_frame = 2 * f.channels
            limit = max_decoded_bytes // per_frame
            if f.frames > limit:
                raise AudioTooLarge(_too_large(f.frames, f.samplerate, f.channels,
                                               max_decoded_bytes))
            samples = f.read(frames=limit + 1, dtype="int16", always_2d=True)
            rate = f.samplerate
            if len(samples) > limit:
                raise AudioTooLarge(_too_large(len(samples), rate, f.channels,
                                               max_decoded_bytes))
    except TranscodeError:
        raise
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


def _too_large(frames: int, rate: int, channels: int, budget: int) -> str:
    seconds = frames / rate if rate > 0 else 0.0
    return (f"the audio ({seconds:.0f} s at {rate} Hz, {channels} channel(s)) decodes to over "
            f"{budget} bytes, the service.max_decoded_audio_bytes limit")
