"""The sans-IO core: routing decisions, candidate matching, model rewrite, credentials."""

from __future__ import annotations

import orjson
import pytest

from extproc.config import parse_config
from extproc.contract import decode_candidates, encode_candidates
from extproc.core.backends import (
    BackendRuntime,
    backend_runtimes,
    credential_headers,
    header_plan,
    pick_candidate,
    rewrite_model,
    target_path,
)
from extproc.core.endpoints import BY_PATH
from extproc.core.routing import (
    RoutingTable,
    Target,
    check_request_line,
    model_key,
)

from ..refusals import refused, route_body

CFG = parse_config({
    "backends": [
        {"name": "a", "url": "http://127.0.0.1:8001/v1", "models": [{"name": "m1"}, {"name": "solo"}]},
        {"name": "b", "url": "http://127.0.0.1:8002", "models": [{"name": "m1-q"}, {"name": "solo"}],
         "api_key_env": "B_KEY"},
    ],
    "models": [{"name": "pub", "aliases": ["p"], "candidates": [
        {"backend": "a", "model": "m1"}, {"backend": "b", "model": "m1-q"}]}],
    "default_model": "p",
})
TABLE = RoutingTable(CFG)


def body(**kw: object) -> bytes:
    return orjson.dumps({"messages": [{"role": "user", "content": "hi"}], **kw})


def test_exact_alias_default_resolution() -> None:
    d = route_body(TABLE, body(model="pub"))
    assert d.resolution == "exact" and [t.backend for t in d.candidates] == ["a", "b"]
    assert [t.address for t in d.candidates] == ["127.0.0.1:8001", "127.0.0.1:8002"]
    assert decode_candidates(encode_candidates(d.candidates)) == d.candidates
    d = route_body(TABLE, body(model="p"))
    assert d.resolution == "alias" and d.public_model == "pub"
    d = route_body(TABLE, body())
    assert d.resolution == "default" and d.public_model == "pub"


def test_backend_models_exposed_with_all_serving_backends() -> None:
    d = route_body(TABLE, body(model="solo"))
    assert [(t.backend, t.model) for t in d.candidates] == [("a", "solo"), ("b", "solo")]
    assert [t.backend for t in TABLE.entries["m1"].candidates] == ["a"]  # own name too
    assert "pub" not in {t.model for e in TABLE.entries.values() for t in e.candidates}


def test_errors_name_the_problem() -> None:
    e = refused(route_body, TABLE, b'{"model": "pub",')
    assert e["code"] == "invalid_json" and "line 1" in e["message"]
    assert refused(route_body, TABLE, b"[1]")["code"] == "invalid_type"
    e = refused(route_body, TABLE, body(model=["x"]))
    assert e["param"] == "model" and "expected a string" in e["message"]
    e = refused(route_body, TABLE, body(model="zzz"))
    assert e["code"] == "model_not_found" and "pub" in e["available_models"]
    assert refused(route_body, TABLE, b"")["code"] == "invalid_json"


def test_request_line() -> None:
    chat = check_request_line(TABLE, "POST", "/v1/chat/completions")
    assert chat == (BY_PATH["/v1/chat/completions"], None)
    assert check_request_line(TABLE, "POST", "/v1/messages") == (BY_PATH["/v1/messages"], None)
    # Azure OpenAI's client paths name the model (the deployment) in the path.
    assert check_request_line(TABLE, "POST", "/openai/deployments/p%2Fx/embeddings") == (
        BY_PATH["/v1/embeddings"], "p/x")
    assert refused(check_request_line, TABLE, "POST", "/openai/deployments/p/files")[
        "status"] == 404
    models = check_request_line(TABLE, "GET", "/v1/models")
    assert models is not None and models.status == 200
    ids = [m["id"] for m in orjson.loads(models.body)["data"]]
    assert ids == ["m1", "m1-q", "pub", "solo", "p"]
    assert refused(check_request_line, TABLE, "PUT", "/v1/chat/completions")["status"] == 405
    assert refused(check_request_line, TABLE, "POST", "/v1/files")["status"] == 404
    assert refused(check_request_line, TABLE, "POST", "/v1/chat/completions", False)[
        "code"] == "invalid_json"  # no body


CANDS = (Target("a", "m1", "1.1.1.1:1"), Target("b", "m2", "2.2.2.2:2"),
         Target("a", "m3", "1.1.1.1:1"))


@pytest.mark.parametrize(("attempt", "addr", "expected"), [
    (1, "1.1.1.1:1", 0), (2, "2.2.2.2:2", 1), (3, "1.1.1.1:1", 2),
    (2, "1.1.1.1:1", 2),  # entry 2 skipped (not in cluster): next with that address
    (4, "2.2.2.2:2", 1),  # past the list (fallback pick): any candidate with that address
])
def test_pick_candidate(attempt: int, addr: str, expected: int) -> None:
    picked = pick_candidate(CANDS, attempt, addr)
    assert picked is not None and picked[0] == expected


def test_pick_candidate_unknown_address() -> None:
    assert pick_candidate(CANDS, 1, "9.9.9.9:9") is None


def test_rewrite_model_splices_without_reserialising() -> None:
    raw = b'{ "messages": [{"role":"user","content":"say \\"model\\": \\"x\\""}],\n "model" : "pub"}'
    out = rewrite_model(raw, "pub", "m1-q")
    assert out == raw.replace(b'"pub"', b'"m1-q"')
    assert rewrite_model(raw, "m1-q", "m1-q") is None


def test_rewrite_model_ambiguous_falls_back_to_parse() -> None:
    raw = orjson.dumps({"model": "pub", "metadata": {"model": "pub"}})
    out = orjson.loads(rewrite_model(raw, "pub", "new") or b"")
    assert out == {"model": "new", "metadata": {"model": "pub"}}


def test_rewrite_model_inserts_when_absent() -> None:
    assert orjson.loads(rewrite_model(b'{"a": 1}', None, "x") or b"") == {"a": 1, "model": "x"}
    assert orjson.loads(rewrite_model(b" { } ", None, "x") or b"") == {"model": "x"}


def test_credentials_and_paths() -> None:
    with pytest.raises(Exception, match="B_KEY"):
        backend_runtimes(CFG, env={})
    rts = backend_runtimes(CFG, env={"B_KEY": "sek"})
    creds = credential_headers(rts)
    client = {"authorization": "Bearer client", "x-api-key": "client-2"}
    chat = "/v1/chat/completions"
    plan_b = header_plan(rts["b"], chat, creds, client, chat)
    assert ("authorization", "Bearer sek") in plan_b.set and len(plan_b.set) == 1
    assert "x-api-key" in plan_b.remove and "authorization" not in plan_b.remove
    plan_a = header_plan(rts["a"], chat, creds, client, chat)
    assert "authorization" in plan_a.remove and not plan_a.set
    fwd = BackendRuntime("f", None, None, True, "/openai/v1")
    path = target_path(fwd, BY_PATH[chat], False, "/v1/chat/completions?x=1", "m")
    plan_f = header_plan(fwd, path, creds, client, "/v1/chat/completions?x=1")
    assert set(plan_f.set) == {("authorization", "Bearer client"), ("x-api-key", "client-2"),
                               (":path", "/openai/v1/chat/completions?x=1")}
    assert "authorization" not in plan_f.remove


def test_every_attempt_sets_credentials_and_path_from_scratch() -> None:
    """A retry starts from the headers the previous attempt left (Envoy reuses them): a
    custom key header of another backend is removed, and the path comes from the client's."""
    custom = BackendRuntime("c", "x-custom-key", "ck", False, "/api/v1")
    plain = BackendRuntime("p", None, None, True, "/v1")
    creds = credential_headers({"c": custom, "p": plain})
    assert "x-custom-key" in creds
    chat = BY_PATH["/v1/chat/completions"]
    plan = header_plan(plain, target_path(plain, chat, False, chat.path, "m"), creds,
                       {"authorization": "Bearer cl"}, current_path="/api/v1/chat/completions")
    assert "x-custom-key" in plan.remove
    assert set(plan.set) == {("authorization", "Bearer cl"), (":path", "/v1/chat/completions")}
    plan = header_plan(custom, target_path(custom, chat, False, chat.path, "m"), creds,
                       {"authorization": "Bearer cl"}, current_path="/v1/chat/completions")
    assert set(plan.set) == {("x-custom-key", "ck"), (":path", "/api/v1/chat/completions")}
    assert {"authorization", "x-api-key", "api-key"} <= set(plan.remove)


@pytest.mark.parametrize(("raw", "reserialise"), [
    (b'{"model": "pub", "messages": []}', False),
    (b'{"messages": []}', False),
    (b'{"model": "pub", "model": "pub"}', True),
    (b'{"m\\u006fdel": "a", "model": "pub"}', True),
    (b'{"model": "a", "\\u006Dodel": "pub"}', True),
    (b'{"model": "pub", "metadata": {"model": "x"}}', True),   # nested: re-serialised, harmless
    (b'{"model": "pub", "text": "caf\\u00e9 \\u003c"}', False),  # escapes encoders write
    (b'{"model": null}', True),
])
def test_model_key_canonical_or_reserialised(raw: bytes, reserialise: bool) -> None:
    data = orjson.loads(raw)
    assert model_key(raw, data) is reserialise
    assert "model" not in data or data["model"] is not None


def test_model_key_case_variants_are_refused() -> None:
    for key in ("Model", "MODEL", "moDel"):
        assert refused(model_key, b"{}", {"model": "pub", key: "x"})["param"] == key
    assert model_key(b'{"models": 1}', {"models": 1}) is False


@pytest.mark.parametrize("extra", [b'"model": "x", ', b'"m\\u006fdel": "x", ', b''])
def test_model_key_in_large_media_bodies(extra: bytes) -> None:
    """Large bodies are scanned quote to quote: a duplicate or escaped key after a 2 MB
    payload is still found, and a clean one is not re-serialised."""
    payload = b"QUJD" * 500_000
    raw = (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
           b'{"url": "data:image/png;base64,' + payload + b'"}}]}], ' + extra +
           b'"model": "pub"}')
    assert model_key(raw, orjson.loads(raw)) is bool(extra)
