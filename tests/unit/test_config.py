"""Config validation: every problem reported with the path of the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from extproc.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def base() -> dict:
    return {
        "backends": [
            {"name": "a", "url": "http://127.0.0.1:8001/v1", "models": [{"name": "m1"}]},
            {"name": "b", "url": "http://localhost:8002", "models": [{"name": "m2"}]},
        ],
        "models": [{"name": "pub", "aliases": ["p"],
                    "candidates": [{"backend": "a", "model": "m1"}]}],
    }


def problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    return exc.value.problems


def test_demo_config_is_valid() -> None:
    cfg = load_config(ROOT / "config" / "demo.yaml")
    assert {b.name for b in cfg.backends} >= {"local-vllm", "local-llamacpp"}


def test_missing_field_has_key_path() -> None:
    d = base()
    d["backends"][1]["models"][0] = {}
    assert problems(d) == ["backends[1].models[0].name: field required"]


def test_every_problem_is_reported() -> None:
    d = base()
    d["backends"][0]["url"] = "ftp://x"
    d["backends"][1]["nonsense"] = 1
    d["service"] = {"port": 0}
    ps = problems(d)
    assert any(p.startswith("backends[0].url:") for p in ps)
    assert any(p.startswith("backends[1].nonsense: extra inputs") for p in ps)
    assert any(p.startswith("service.port:") for p in ps)


def test_cross_references_checked() -> None:
    d = base()
    d["models"].append({"name": "x", "aliases": ["pub"],
                        "candidates": [{"backend": "zz", "model": "m1"},
                                       {"backend": "b", "model": "nope"}]})
    d["default_model"] = "missing"
    ps = problems(d)
    assert "models[1].aliases[0]: 'pub' is already used by models[0].name" in ps
    assert any(p.startswith("models[1].candidates[0].backend: unknown backend 'zz'") for p in ps)
    assert any(p.startswith("models[1].candidates[1].model: backend 'b' has no model 'nope'")
               for p in ps)
    assert any(p.startswith("default_model:") for p in ps)


def test_duplicate_address_rejected_hostnames_get_egress_ports() -> None:
    from extproc.config import pool_addresses

    d = base()
    d["backends"].append({"name": "c", "url": "https://api.example.com/v1", "models": [{"name": "q"}]})
    d["backends"].append({"name": "e", "url": "http://gpu.lan:8000/v1", "models": [{"name": "q"}],
                          "egress_port": 12000})
    assert pool_addresses(parse_config(d))["c"] == "127.0.0.1:10100"
    assert pool_addresses(parse_config(d))["e"] == "127.0.0.1:12000"
    d["backends"].append({"name": "d", "url": "http://127.0.0.1:8001/v1", "models": [{"name": "r"}]})
    ps = problems(d)
    assert any(p.startswith("backends[4].url: 127.0.0.1:8001 is already backend 'a'") for p in ps)


def test_check_cli_exits_nonzero_with_paths(tmp_path: Path, capsys) -> None:
    from extproc.cli import main

    d = base()
    del d["backends"][1]["models"][0]["name"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(d))
    with pytest.raises(SystemExit) as exc:
        main(["check", str(bad)])
    assert exc.value.code == 2
    assert "backends[1].models[0].name: field required" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(base()))
    assert main(["check", str(good)]) == 0
    assert "ok" in capsys.readouterr().out


def test_not_yaml_and_not_mapping(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("backends: [")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    assert exc.value.problems[0].startswith("(file): not valid YAML")
    assert problems([1, 2]) == ["(root): the config must be a mapping"]  # type: ignore[arg-type]


def test_grpc_limit_must_hold_the_largest_body() -> None:
    (problem,) = problems({**base(), "service": {"max_message_bytes": 8 * 1024 * 1024}})
    assert problem.startswith("service.max_message_bytes: 8388608 is below envoy.max_body_bytes")
    parse_config({**base(), "service": {"max_message_bytes": 8 * 1024 * 1024},
                  "envoy": {"max_body_bytes": 4 * 1024 * 1024}})


def test_a_unix_socket_path_must_fit_a_socket_address() -> None:
    (problem,) = problems({**base(), "service": {"unix_socket": "/tmp/" + "s" * 100}})
    assert problem.startswith("service.unix_socket:") and "104 bytes" in problem
    cfg = parse_config({**base(), "service": {"unix_socket": "/tmp/x.sock", "workers": 3}})
    assert [cfg.service.socket_path(i) for i in range(3)] == \
        ["/tmp/x.sock", "/tmp/x.sock.1", "/tmp/x.sock.2"]
