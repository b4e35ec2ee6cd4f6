"""Routing hints, metadata hygiene, propagation, access log and metrics through a real Envoy."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from extproc_dev.stack import Stack

from .conftest import received, reset, stack_config, start_stack, wait_line

BACKENDS = ("local", "cloud", "spare")


@pytest.fixture(scope="module")
def hstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cfg = stack_config(
        backends=[
            {"name": "local", "preset": "ollama",
             "models": [{"name": "glm-4.7-flash", "tags": ["local", "free"]}]},
            {"name": "cloud", "preset": "openai", "api_key_env": "E2E_BACKEND_KEY",
             "models": [{"name": "glm-5.1", "tags": ["cloud"]}]},
            {"name": "spare", "preset": "vllm", "models": [{"name": "glm-spare",
                                                            "tags": ["local"]}]},
        ],
        models=[
            {"name": "glm", "candidates": [{"backend": "local", "model": "glm-4.7-flash"},
                                           {"backend": "cloud", "model": "glm-5.1"},
                                           {"backend": "spare", "model": "glm-spare"}]},
            {"name": "big", "candidates": [{"backend": "cloud", "model": "glm-5.1"}]},
        ],
        hints={
            "policies": {"force-cloud": {"require_tags": ["cloud"]},
                         "local-only": {"require_tags": ["local"]}},
            "access": [{"clients": ["*"], "allow": ["intent"], "intents": ["local-only"]},
                       {"clients": ["team-a"], "allow": ["intent", "model", "backend", "order"]}],
            "propagate": {"x-session-id": "hermes_session_id", "x-user-id": "hermes_user_id"},
        },
    )
    stack = start_stack(tmp_path_factory.mktemp("hints"), cfg)
    yield stack
    stack.stop()


@pytest.fixture(autouse=True)
def clean(hstack: Stack) -> None:
    for b in BACKENDS:
        reset(hstack, b)


def ask(stack: Stack, client_id: str | None = None, model: str = "glm", **kw: object):
    headers = {"x-client-id": client_id} if client_id else {}
    headers.update(kw.pop("extra_headers", {}))  # type: ignore[arg-type]
    c = openai.OpenAI(base_url=stack.envoy_url + "/v1", api_key="k", max_retries=0, timeout=30)
    return c.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "a hard question"}],
        extra_headers=headers, **kw)


def test_intent_force_cloud_switches_backend_without_restart(hstack: Stack) -> None:
    r = ask(hstack, "team-a", metadata={"route_intent": "force-cloud"}, store=True)
    assert r.headers["x-extproc-backend"] == "cloud"
    r = ask(hstack, "team-a")
    assert r.headers["x-extproc-backend"] == "local"
    (got,) = received(hstack, "cloud")
    assert got["headers"]["x-llm-intent"] == "force-cloud"


def test_intent_via_header(hstack: Stack) -> None:
    r = ask(hstack, "team-a", extra_headers={"x-route-intent": "force-cloud"})
    assert r.headers["x-extproc-backend"] == "cloud"
    (got,) = received(hstack, "cloud")
    assert "x-route-intent" not in got["headers"]


def test_client_not_allowed_does_not_get_the_effect(hstack: Stack) -> None:
    with pytest.raises(openai.PermissionDeniedError) as exc:
        ask(hstack, None, metadata={"route_intent": "force-cloud"})
    assert exc.value.body["code"] == "hint_not_allowed"
    assert exc.value.body["param"] == "route_intent"
    assert received(hstack, "cloud") == []
    # Pins need an explicit grant too: anonymous may use local-only, nothing else.
    with pytest.raises(openai.PermissionDeniedError):
        ask(hstack, None, metadata={"route_backend": "cloud"})
    r = ask(hstack, None, metadata={"route_intent": "local-only"})
    assert r.headers["x-extproc-backend"] in ("local", "spare")


def test_unknown_intent_is_400(hstack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        ask(hstack, "team-a", metadata={"route_intent": "teleport"})
    assert exc.value.body["code"] == "unknown_hint"
    assert "force-cloud" in exc.value.body["message"]


def test_pin_backend_model_and_order(hstack: Stack) -> None:
    assert ask(hstack, "team-a", metadata={"route_backend": "spare"}, store=True) \
        .headers["x-extproc-backend"] == "spare"
    r = ask(hstack, "team-a", metadata={"route_order": "spare,cloud"})
    assert r.headers["x-extproc-backend"] == "spare"
    r = ask(hstack, "team-a", model="glm", metadata={"route_model": "big"})
    assert r.headers["x-extproc-backend"] == "cloud" and r.headers["x-extproc-model"] == "glm-5.1"


def test_routing_keys_never_reach_a_backend_and_context_propagates(hstack: Stack) -> None:
    meta = {"route_intent": "local-only", "hermes_session_id": "matrix-room-abc",
            "hermes_user_id": "@a1:chat"}
    ask(hstack, "team-a", metadata=meta, extra_headers={"x-session-id": "forged"})
    (got,) = received(hstack, "local")
    assert got["json"]["metadata"] == {"hermes_session_id": "matrix-room-abc",
                                       "hermes_user_id": "@a1:chat"}
    assert got["headers"]["x-session-id"] == "matrix-room-abc"
    assert got["headers"]["x-user-id"] == "@a1:chat"
    assert got["headers"]["x-llm-intent"] == "local-only"


def test_openai_like_backend_never_sees_metadata_without_store(hstack: Stack) -> None:
    ask(hstack, "team-a", model="big", metadata={"hermes_session_id": "s1"})
    (got,) = received(hstack, "cloud")
    assert "metadata" not in got["json"]
    ask(hstack, "team-a", model="big", metadata={"hermes_session_id": "s1"}, store=True)
    second = received(hstack, "cloud")[-1]
    assert second["json"]["metadata"] == {"hermes_session_id": "s1"}
    ask(hstack, "team-a", model="glm", metadata={"hermes_session_id": "s2"})
    (local,) = received(hstack, "local")  # others take metadata as it is
    assert local["json"]["metadata"] == {"hermes_session_id": "s2"}


@pytest.mark.parametrize(("meta", "param"), [
    ({f"k{i}": "v" for i in range(17)}, "metadata"),
    ({"k" * 65: "v"}, "metadata." + "k" * 64),
    ({"k": "v" * 513}, "metadata.k"),
    ({"k": 5}, "metadata.k"),
])
def test_metadata_limits(hstack: Stack, meta: dict, param: str) -> None:
    r = httpx.post(hstack.envoy_url + "/v1/chat/completions", json={
        "model": "glm", "metadata": meta, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_metadata" and err["param"] == param
    assert all(received(hstack, b) == [] for b in BACKENDS)


def test_access_log_carries_backend_and_reason(hstack: Stack) -> None:
    r = ask(hstack, "team-a", metadata={"route_intent": "force-cloud"}, store=True)
    rid = r.headers["x-request-id"]
    access = wait_line(hstack, "envoy", rid, '"envoy.access"')
    assert access["backend"] == "cloud" and access["intent"] == "force-cloud"
    assert access["route_reason"] == "exact:glm->glm; intent=force-cloud; dropped=2"
    decision = wait_line(hstack, "service", rid, '"routing.decision"')
    assert decision["hints"]["applied"] == ["intent"] and decision["hints"]["policy"] == \
        "force-cloud"
    assert {d["backend"] for d in decision["dropped_candidates"]} == {"local", "spare"}


def test_metrics_show_the_runs_counts(hstack: Stack) -> None:
    url = f"http://127.0.0.1:{hstack.config.service.metrics_port}/metrics"

    def value(name: str, **labels: str) -> float:
        for line in httpx.get(url).text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line
                                                    for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = value("llm_extproc_requests_total", gen_ai_request_model="big", backend="cloud",
                   outcome="ok")
    hints_before = value("llm_extproc_hints_total", kind="intent", result="applied")
    for _ in range(3):
        ask(hstack, "team-a", model="big")
    ask(hstack, "team-a", metadata={"route_intent": "force-cloud"}, store=True)
    deadline = time.monotonic() + 5  # the decision log's batches may split the four
    while time.monotonic() < deadline and (value(
            "llm_extproc_requests_total", gen_ai_request_model="big", backend="cloud",
            outcome="ok") < before + 3 or value(
            "llm_extproc_hints_total", kind="intent", result="applied") < hints_before + 1):
        time.sleep(0.05)
    assert value("llm_extproc_requests_total", gen_ai_request_model="big", backend="cloud",
                 outcome="ok") == before + 3
    assert value("llm_extproc_hints_total", kind="intent", result="applied") >= hints_before + 1
    assert value("llm_extproc_processing_seconds_count", stage="route",
                 phase="request_body") > 0
