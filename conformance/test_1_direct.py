"""Direct: each case to the real vLLM and to our vLLM emulator; their answers must match (status,
content type, error type and message, body shape) or the difference must be listed with its
reason in ``vllm_differences.yaml``. A listed difference that no longer occurs fails too: the
list says what is true today."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml

from .cases import CASES, Answer, Case, ask, differences
from .conftest import REPORT
from .real_vllm import Server

LISTED: dict[str, dict[str, str]] = yaml.safe_load(
    (Path(__file__).parent / "vllm_differences.yaml").read_text()) or {}


def summary(a: Answer) -> str:
    what = a.error_type or ("stream" if a.events else a.content_type or "-")
    return f"{a.status} {what}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_emulator_answers_as_the_real_server(case: Case, real_vllm: Server,
                                                 emulated_vllm: str) -> None:
    with httpx.Client() as client:
        real = ask(client, real_vllm.url, case)
        emulated = ask(client, emulated_vllm, case)
    found = differences(real, emulated)
    listed = LISTED.get(case.name, {})
    unexplained = [d for d in found if not any(d.startswith(k) for k in listed)]
    stale = [k for k in listed if not any(d.startswith(k) for d in found)]
    verdict = "same" if not found else "listed: " + "; ".join(sorted(set(listed.values())))
    if unexplained or stale:
        verdict = "DIFFERENT: " + "; ".join(unexplained + [f"listed, no longer: {k}"
                                                             for k in stale])
    REPORT.direct[case.name] = (summary(real), summary(emulated), verdict, case.about)
    assert not unexplained, f"{case.about}: unexplained differences {unexplained}\nreal: " \
        f"{real.raw}\nemulator: {emulated.raw}"
    assert not stale, f"{case.about}: listed differences that no longer occur: {stale}"


def test_every_listed_difference_names_a_case() -> None:
    assert set(LISTED) <= {c.name for c in CASES}, set(LISTED) - {c.name for c in CASES}
