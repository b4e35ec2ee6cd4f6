"""Backends by host name over TLS (cloud APIs) through the egress listener: the certificate is
verified, the host name is sent, credentials are injected, and failover still walks the order."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from extproc_dev.stack import Stack, free_port

from .conftest import BACKEND_KEY, received, stack_config, write_config


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("egress")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    cfg = stack_config(
        backends=[
            {"name": "cloud", "preset": "openai", "url": f"https://localhost:{free_port()}/v1",
             "tls_ca_file": str(cert), "api_key_env": "E2E_BACKEND_KEY",
             "egress_port": free_port(), "models": ["gpt-x"]},
            {"name": "untrusted", "preset": "openai",
             "url": f"https://localhost:{free_port()}/v1", "egress_port": free_port(),
             "models": ["gpt-x"]},
        ],
        models=[{"name": "m-cloud", "candidates": [{"backend": "cloud", "model": "gpt-x"}]},
                {"name": "m-untrusted", "candidates": [{"backend": "untrusted",
                                                        "model": "gpt-x"}]},
                {"name": "m-failover", "candidates": [{"backend": "untrusted", "model": "gpt-x"},
                                                      {"backend": "cloud", "model": "gpt-x"}]}])
    stack = Stack(write_config(tmp, cfg), workdir=str(tmp), tls=(str(cert), str(key)),
                  env={"E2E_BACKEND_KEY": BACKEND_KEY}).start()
    yield stack
    stack.stop()


def chat(stack: Stack, model: str) -> httpx.Response:
    return httpx.post(stack.envoy_url + "/v1/chat/completions", timeout=30, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}]})


def test_tls_backend_by_name_with_verified_certificate(tls_stack: Stack) -> None:
    r = chat(tls_stack, "m-cloud")
    assert r.status_code == 200, r.text
    assert r.headers["x-extproc-backend"] == "cloud"
    (got,) = [x for x in received(tls_stack, "cloud") if x["method"] == "POST"]
    assert got["headers"]["host"].split(":")[0] == "localhost"
    assert got["headers"]["authorization"] == f"Bearer {BACKEND_KEY}"


def test_untrusted_certificate_fails_closed_with_json(tls_stack: Stack) -> None:
    r = chat(tls_stack, "m-untrusted")
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["backend"] == "untrusted" and "localhost" in err["message"]
    assert "CERTIFICATE_VERIFY_FAILED" in err["code"], err  # the handshake was refused
    assert received(tls_stack, "untrusted") == []  # the TLS handshake never completed


def test_failover_across_egress_backends(tls_stack: Stack) -> None:
    r = chat(tls_stack, "m-failover")
    assert r.status_code == 200 and r.headers["x-extproc-backend"] == "cloud"
    assert r.headers["x-extproc-attempts"] == "2"


def test_rendered_config_verifies_certificates() -> None:
    from extproc.config import parse_config
    from extproc.render import render

    doc = render(parse_config({"backends": [{"name": "c", "url": "https://api.example.com/v1",
                                             "models": [{"name": "m"}]}]}))
    cluster = next(c for c in doc["static_resources"]["clusters"] if c["name"] == "egress_c")
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.example.com"
    v = tls["common_tls_context"]["validation_context"]
    assert v["trusted_ca"]["filename"] == "/etc/ssl/certs/ca-certificates.crt"
    assert v["match_typed_subject_alt_names"][0]["matcher"]["exact"] == "api.example.com"
    assert Path(v["trusted_ca"]["filename"]).exists()
