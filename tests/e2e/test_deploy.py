"""What can be checked of the Docker and Kubernetes stacks without a container engine."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import compose_spec
import jsonschema
import kubernetes_validate
import pytest
import yaml

from extproc.config import load_config, parse_config
from extproc.render.bootstrap import render_yaml
from extproc_dev.stack import envoy_binary

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
K8S = ROOT / "deploy" / "kubernetes"


def test_compose_matches_the_compose_specification() -> None:
    spec = compose_spec.PyCompose.from_yaml((ROOT / "docker-compose.yaml").read_text())
    spec.to_spec()  # raises on anything the specification does not allow
    assert set(spec.service_names()) >= {"envoy", "extproc", "prometheus", "aux-vision"}


def test_compose_files_and_build_targets_exist() -> None:
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", (ROOT / "Dockerfile").read_text(), re.M))
    for name, svc in COMPOSE["services"].items():
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / "Dockerfile").exists(), name
            assert svc["build"]["target"] in targets, name
        for vol in svc.get("volumes", []):
            host = vol.split(":", 1)[0]
            assert (ROOT / host).exists(), f"{name}: {host}"
        for dep in svc.get("depends_on", {}):
            assert dep in COMPOSE["services"], f"{name} depends on unknown {dep}"


def test_envoy_image_is_the_version_the_tests_use() -> None:
    out = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True).stdout
    version = re.search(r"/(\d+\.\d+\.\d+)/", out).group(1)  # type: ignore[union-attr]
    assert COMPOSE["services"]["envoy"]["image"] == f"envoyproxy/envoy:v{version}"


def test_rendered_compose_envoy_config_is_fresh_and_valid() -> None:
    cfg = load_config(ROOT / "config" / "compose.yaml")
    assert (ROOT / "envoy" / "compose.yaml").read_text() == render_yaml(cfg, "compose.yaml")
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c",
                        str(ROOT / "envoy" / "compose.yaml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def ip_of(service: str) -> str:
    return COMPOSE["services"][service]["networks"]["llm"]["ipv4_address"]


def test_compose_addresses_and_ports_match_the_rendered_envoy_config() -> None:
    cfg = load_config(ROOT / "config" / "compose.yaml")
    doc = yaml.safe_load((ROOT / "envoy" / "compose.yaml").read_text())
    listener = doc["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert f"{listener['port_value']}:{listener['port_value']}" in \
        COMPOSE["services"]["envoy"]["ports"]
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    svc_addr = clusters["extproc_service"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert svc_addr["endpoint"]["address"]["socket_address"] == {
        "address": ip_of("extproc"), "port_value": cfg.service.port}
    pool = clusters["llm_backends"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    for ep, b in zip(pool, cfg.backends, strict=True):
        sock = ep["endpoint"]["address"]["socket_address"]
        svc = COMPOSE["services"][b.name]
        assert ip_of(b.name) == sock["address"]
        cmd = svc["entrypoint"]
        arg = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
        assert int(arg["--port"]) == sock["port_value"]
        assert arg["--models"] == ",".join(m.name for m in b.models)
        aux = cfg.vision is not None and cfg.vision.backend == b.name
        assert arg["--flavour"] == ("ocr" if aux else b.preset)
        assert COMPOSE["services"]["extproc"]["depends_on"][b.name] == {
            "condition": "service_healthy"}
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    assert prom["scrape_configs"][0]["static_configs"][0]["targets"] == [
        f"{ip_of('extproc')}:{cfg.service.metrics_port}"]


def test_compose_config_is_the_demo_config_but_for_addresses() -> None:
    def strip(path: str) -> dict:
        d = yaml.safe_load((ROOT / "config" / path).read_text())
        d.pop("service"), d.pop("envoy")
        for b in d["backends"]:
            b.pop("url")
        return d

    assert strip("compose.yaml") == strip("demo.yaml")


def test_dockerfile_commands_exist_in_the_project() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for item in src.split():
            assert (ROOT / item).exists(), item
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'extproc = "extproc.cli:main"' in pyproject
    for sub in re.findall(r'"extproc", "(\w+)"|\["(\w+)", "--config"', text):
        name = sub[0] or sub[1]
        r = subprocess.run([sys.executable, "-m", "extproc.cli", name, "--help"],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"extproc {name}: {r.stderr}"
    assert "USER extproc" in text  # non-root


@pytest.mark.parametrize("name", ["configmap.yaml", "deployment.yaml", "service.yaml"])
def test_kubernetes_manifests_match_their_schemas(name: str) -> None:
    kubernetes_validate.validate(yaml.safe_load((K8S / name).read_text()), "1.33.0",
                                 strict=True)


def test_extension_policy_matches_its_schema_and_points_at_the_service() -> None:
    policy = yaml.safe_load((K8S / "extension-policy.yaml").read_text())
    schema = json.loads((ROOT / "tests" / "schemas" / "envoyextensionpolicy-extproc.json")
                        .read_text())
    jsonschema.validate(policy, schema)
    service = yaml.safe_load((K8S / "service.yaml").read_text())
    grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    ref = policy["spec"]["extProc"][0]["backendRefs"][0]
    assert (ref["name"], ref["port"]) == (service["metadata"]["name"], grpc["port"])
    bad = json.loads(json.dumps(policy))
    bad["spec"]["extProc"][0]["procesingMode"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_configmap_holds_a_valid_config_matching_the_deployment() -> None:
    cm = yaml.safe_load((K8S / "configmap.yaml").read_text())
    cfg = parse_config(yaml.safe_load(cm["data"]["config.yaml"]))
    assert cfg.ai_gateway.model_header == "x-ai-eg-model"
    dep = yaml.safe_load((K8S / "deployment.yaml").read_text())
    container = dep["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": cfg.service.port, "metrics": cfg.service.metrics_port}
    assert container["readinessProbe"]["grpc"]["port"] == cfg.service.port
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert all((K8S / r).exists() for r in kust["resources"])


def test_the_ai_gateway_resources_are_what_extproc_envoy_snippets_renders() -> None:
    """deploy/kubernetes/ ships the Envoy Gateway resources `extproc envoy --snippets` renders
    for its own config (conformance/test_4_aigw.py runs them in a real AI Gateway)."""
    from extproc.render.snippets import ai_gateway_resources, render_snippets

    cm = yaml.safe_load((K8S / "configmap.yaml").read_text())
    cfg = parse_config(yaml.safe_load(cm["data"]["config.yaml"]))
    shipped = [*yaml.safe_load_all((K8S / "extension-policy.yaml").read_text()),
               *yaml.safe_load_all((K8S / "filter-order.yaml").read_text())]
    assert shipped == ai_gateway_resources(cfg)
    text = render_snippets(cfg)
    assert list(yaml.safe_load_all(text.split("```yaml\n")[1].split("```")[0])) == shipped
