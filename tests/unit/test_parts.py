"""Parts core: every accepted shape parsed into one form; per-preset plans; exact 400s."""

from __future__ import annotations

import base64
import copy

import orjson
import pytest

from extproc.core.parts import (
    PRESETS,
    convert_body,
    fetch_targets,
    inspect_parts,
    plan,
)
from extproc_dev.emulators import ACCEPTED_PARTS, Emulator

from ..media import b64, clip, data_url, png
from ..refusals import refused

WAV, FLAC = clip("wav"), clip("flac")
PNG = png()


def req(*parts: object) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}]}


ALL_SHAPES = [
    {"type": "text", "text": "hi"},
    {"type": "input_text", "text": "hi"},
    {"type": "image_url", "image_url": {"url": data_url("image/png", PNG), "detail": "low"}},
    {"type": "image_url", "image_url": data_url("image/png", PNG)},
    {"image_url": {"url": data_url("image/png", PNG)}},
    {"type": "input_image", "image_url": data_url("image/png", PNG), "detail": "auto"},
    {"type": "image", "url": data_url("image/png", PNG)},
    {"type": "image", "image": data_url("image/png", PNG)},
    {"type": "input_audio", "input_audio": {"data": b64(WAV), "format": "wav"}},
    {"type": "audio_url", "audio_url": {"url": data_url("audio/wav", WAV)}},
    {"type": "audio", "url": data_url("audio/flac", FLAC)},
    {"input_audio": {"data": b64(WAV), "format": "wav"}},
    {"type": "text", "text": "end"},
]


def test_every_shape_parses() -> None:
    report = inspect_parts(req(*ALL_SHAPES))
    kinds = [p.sig.kind for p in report.parts]
    assert kinds == ["text", "text"] + ["image"] * 6 + ["audio"] * 4 + ["text"]
    shapes = [p.sig.shape for p in report.parts]
    assert shapes[:8] == ["text", "input_text", "image_url", "image_url_string",
                          "untyped_image_url", "input_image", "hf_image", "hf_image"]
    assert [p.sig.fmt for p in report.parts[8:12]] == ["wav", "wav", "flac", "wav"]
    assert report.warnings == []


@pytest.mark.parametrize("preset", ["vllm", "sglang", "llamacpp", "openai"])
def test_every_shape_converts_to_what_the_preset_emulator_accepts(preset: str) -> None:
    data = req(*copy.deepcopy(ALL_SHAPES))
    report = inspect_parts(data)
    profile = PRESETS[preset]
    changed = convert_body(data, report, profile, {})
    emu = Emulator("e", preset, ["m"])
    status, body, _ = emu.handle("POST", "/v1/chat/completions", {}, orjson.dumps(data))
    assert status == 200, body
    # Parts the backend takes natively are passed through untouched.
    for before, after in zip(ALL_SHAPES, data["messages"][0]["content"], strict=True):
        if before.get("type") in ACCEPTED_PARTS[preset] and before.get("type") != "image_url":
            assert after == before
    assert changed > 0


def test_ollama_gets_images_only_and_refuses_audio() -> None:
    data = req(*copy.deepcopy(ALL_SHAPES[2:8]))  # the six image shapes
    convert_body(data, inspect_parts(data), PRESETS["ollama"], {})
    status, body, _ = Emulator("o", "ollama", ["m"]).handle(
        "POST", "/v1/chat/completions", {}, orjson.dumps(data))
    assert status == 200, body
    audio = inspect_parts(req(ALL_SHAPES[8])).parts[0].sig
    assert plan(PRESETS["ollama"], audio) == "refuse"


def test_audio_url_data_to_input_audio_without_network() -> None:
    data = req({"type": "audio_url", "audio_url": {"url": data_url("audio/wav", WAV)}})
    report = inspect_parts(data)
    assert fetch_targets(PRESETS["llamacpp"], report) == []
    convert_body(data, report, PRESETS["llamacpp"], {})
    assert data["messages"][0]["content"][0] == {
        "type": "input_audio", "input_audio": {"data": b64(WAV), "format": "wav"}}


def test_flac_transcoded_to_wav_for_wav_mp3_backend() -> None:
    import io

    import soundfile

    data = req({"type": "input_audio", "input_audio": {"data": b64(FLAC), "format": "flac"}})
    report = inspect_parts(data)
    assert plan(PRESETS["llamacpp"], report.parts[0].sig) == "transcode"
    assert plan(PRESETS["vllm"], report.parts[0].sig) == "keep"
    convert_body(data, report, PRESETS["llamacpp"], {})
    out = data["messages"][0]["content"][0]["input_audio"]
    assert out["format"] == "wav"
    samples, rate = soundfile.read(io.BytesIO(base64.b64decode(out["data"])))
    assert rate == 16000 and len(samples) == 4000


def test_declared_format_mismatch_is_reported_and_fixed() -> None:
    data = req({"type": "input_audio", "input_audio": {"data": b64(WAV), "format": "mp3"}})
    report = inspect_parts(data)
    assert report.warnings == [
        "messages[0].content[0].input_audio.format: declared mp3, the bytes are wav"]
    assert plan(PRESETS["llamacpp"], report.parts[0].sig) == "reshape"
    convert_body(data, report, PRESETS["llamacpp"], {})
    assert data["messages"][0]["content"][0]["input_audio"]["format"] == "wav"


def test_remote_urls_fetched_only_for_backends_that_cannot() -> None:
    data = req({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
               {"type": "audio_url", "audio_url": {"url": "https://example.com/a.flac"}})
    report = inspect_parts(data)
    assert fetch_targets(PRESETS["vllm"], report) == []
    assert [p.sig.kind for p in fetch_targets(PRESETS["llamacpp"], report)] == ["audio"]
    fetched = {"https://example.com/a.flac": ("audio/flac", FLAC)}
    convert_body(data, report, PRESETS["llamacpp"], fetched)
    assert data["messages"][0]["content"][0]["image_url"]["url"].startswith("https://")
    assert data["messages"][0]["content"][1]["input_audio"]["format"] == "wav"
    data = req({"type": "image_url", "image_url": "https://example.com/cat.png"})
    report = inspect_parts(data)
    convert_body(data, report, PRESETS["ollama"], {"https://example.com/cat.png":
                                                   ("image/png", PNG)})
    assert data["messages"][0]["content"][0] == {
        "type": "image_url", "image_url": {"url": data_url("image/png", PNG)}}


def test_fetched_file_of_wrong_type_is_400() -> None:
    data = req({"type": "image_url", "image_url": "https://example.com/x"})
    report = inspect_parts(data)
    err = refused(convert_body, data, report, PRESETS["ollama"],
                  {"https://example.com/x": ("text/html", b"<html>")})
    assert (err["status"], err["code"]) == (400, "invalid_content_type")


@pytest.mark.parametrize(("body", "code", "param"), [
    ({"messages": "hi"}, "invalid_type", "messages"),
    ({"messages": ["hi"]}, "invalid_type", "messages[0]"),
    ({"messages": [{"role": "user", "content": 5}]}, "invalid_type", "messages[0].content"),
    (req({"type": "text", "text": "a"}, "b"), "invalid_type", "messages[0].content[1]"),
    (req({"type": "text", "text": 1}), "invalid_type", "messages[0].content[0].text"),
    (req({"type": "image_url", "image_url": {"url": 3}}), "invalid_type",
     "messages[0].content[0].image_url.url"),
    (req({"type": "input_audio", "input_audio": {"data": "@@@@", "format": "wav"}}),
     "invalid_base64", "messages[0].content[0].input_audio.data"),
    (req({"type": "input_audio", "input_audio": {"data": "AAAA"}}), "invalid_type",
     "messages[0].content[0].input_audio.format"),
    (req({"type": "audio_url", "audio_url": {"url": "data:audio/wav,AAAA"}}),
     "invalid_data_url", "messages[0].content[0].audio_url.url"),
    (req({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}),
     "invalid_base64", "messages[0].content[0].image_url.url"),
])
def test_errors_name_the_exact_place(body: dict, code: str, param: str) -> None:
    err = refused(inspect_parts, body)
    assert (err["status"], err["code"], err["param"]) == (400, code, param)
    assert param.split(".")[-1].split("[")[0] in err["message"]


def test_preset_fields_overridable_from_config() -> None:
    from extproc.config import parse_config
    from extproc.core.routing import RoutingTable

    cfg = parse_config({"backends": [{
        "name": "x", "preset": "llamacpp", "url": "http://127.0.0.1:1/v1", "models": [{"name": "m"}],
        "parts": {"audio_formats": ["wav", "mp3", "flac"], "fetches_urls": False}}]})
    p = RoutingTable(cfg).profiles["x"]
    assert p.audio_formats == ("wav", "mp3", "flac") and p.fetches_urls is False
    assert p.accepts == PRESETS["llamacpp"].accepts  # unset fields keep the preset's value
    flac = inspect_parts(req({"type": "input_audio", "input_audio": {"data": b64(FLAC),
                                                                     "format": "flac"}}))
    assert plan(p, flac.parts[0].sig) == "keep"
    from extproc.config import ConfigError

    with pytest.raises(ConfigError) as exc:
        parse_config({"backends": [{"name": "x", "url": "http://127.0.0.1:1", "models": [
            {"name": "m"}], "parts": {"accepts": ["text", "hologram"]}}]})
    assert exc.value.problems[0].startswith("backends[0].parts.accepts: value error, unknown part")


def test_attempt_stage_skips_revalidating_what_the_route_stage_checked() -> None:
    bad = req({"type": "input_audio", "input_audio": {"data": "not*base64", "format": "wav"}})
    refused(inspect_parts, bad)
    assert inspect_parts(bad, validate=False).parts[0].sig.kind == "audio"


def test_transcode_refuses_audio_that_decodes_past_its_budget_before_decoding() -> None:
    import io
    import time

    import numpy as np
    import soundfile

    from extproc.core.audio import AudioTooLarge, transcode

    buf = io.BytesIO()
    with soundfile.SoundFile(buf, "w", 48000, 2, format="FLAC") as f:
        for _ in range(60):
            f.write(np.zeros((48000 * 10, 2), dtype="int16"))  # 10 minutes of silence
    t0 = time.monotonic()
    with pytest.raises(AudioTooLarge, match="600 s at 48000 Hz"):
        transcode(buf.getvalue(), "wav", 24 << 20)
    assert time.monotonic() - t0 < 0.1
    small = transcode(buf.getvalue(), "wav", 200 << 20)[:4]
    assert small == b"RIFF"
