"""Direct: each case to each real server (vLLM, llama.cpp's) and to our emulator of it; their
answers must match (status, content type, error type, first message line and param, body
shape) or the difference must be listed with its reason in ``<server>_differences.yaml``. A
listed difference that no longer occurs fails too: the lists say what is true today."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml

from .cases import CASES, Answer, Case, ask, differences
from .conftest import KINDS, REPORT
from .servers import Server

LISTED: dict[str, dict[str, dict[str, str]]] = {
    kind: yaml.safe_load((Path(__file__).parent / f"{kind}_differences.yaml").read_text()) or {}
    for kind in KINDS}


def summary(a: Answer) -> str:
    what = a.error_type or ("stream" if a.events else a.content_type or "-")
    return f"{a.status} {what}"


@pytest.mark.parametrize(("kind", "case"), [(k, c) for k in KINDS for c in CASES],
                         ids=[f"{k}-{c.name}" for k in KINDS for c in CASES])
def test_the_emulator_answers_as_the_real_server(kind: str, case: Case,
                                                 request: pytest.FixtureRequest) -> None:
    real_server: Server = request.getfixturevalue(f"real_{kind}")
    emulator: str = request.getfixturevalue(f"emulated_{kind}")
    with httpx.Client() as client:  # (a client per case: llama-server drops idle connections)
        real = ask(client, real_server.url, case)
    with httpx.Client() as client:
        emulated = ask(client, emulator, case)
    found = differences(real, emulated)
    listed = LISTED[kind].get(case.name, {})
    unexplained = [d for d in found if not any(d.startswith(k) for k in listed)]
    stale = [k for k in listed if not any(d.startswith(k) for d in found)]
    verdict = "same" if not found else "listed: " + "; ".join(sorted(set(listed.values())))
    if unexplained or stale:
        verdict = "DIFFERENT: " + "; ".join(unexplained + [f"listed, no longer: {k}"
                                                             for k in stale])
    REPORT.direct[(kind, case.name)] = (summary(real), summary(emulated), verdict, case.about)
    assert not unexplained, f"{case.about}: unexplained differences {unexplained}\nreal: " \
        f"{real.raw}\nemulator: {emulated.raw}"
    assert not stale, f"{case.about}: listed differences that no longer occur: {stale}"


@pytest.mark.parametrize("kind", KINDS)
def test_every_listed_difference_names_a_case(kind: str) -> None:
    names = {c.name for c in CASES}
    assert set(LISTED[kind]) <= names, set(LISTED[kind]) - names
