"""The configuration reference and JSON Schema are generated from the config models; the
copies in docs/ must be what the code generates today, and every key must say what it does."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml

from extproc.config_reference import json_schema, reference, undocumented

ROOT = Path(__file__).resolve().parents[2]


def test_every_key_has_a_description() -> None:
    assert undocumented() == [], "describe these keys in src/extproc/config.py"


def test_the_docs_are_what_the_code_generates() -> None:
    fix = "regenerate: extproc schema --reference > docs/configuration.md; " \
          "extproc schema > docs/config.schema.json"
    assert (ROOT / "docs" / "configuration.md").read_text() == reference(), fix
    assert (ROOT / "docs" / "config.schema.json").read_text() == json_schema(), fix


def test_the_example_configs_pass_the_schema_and_point_to_it() -> None:
    schema = json.loads(json_schema())
    for name in ("demo.yaml", "compose.yaml"):
        text = (ROOT / "config" / name).read_text()
        assert text.startswith("# yaml-language-server: $schema=../docs/config.schema.json")
        jsonschema.validate(yaml.safe_load(text), schema)
    bad = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    bad["service"]["port"] = "not a port"
    try:
        jsonschema.validate(bad, schema)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("the schema let a bad port through")


def test_the_reference_names_settings_users_looked_for() -> None:
    page = reference()
    for section, key in (("hints.metadata_keys", "intent"), ("fetch", "ca_bundle"),
                         ("fetch", "allow_http"), ("fetch", "max_redirects")):
        assert f"## `{section}`" in page and f"| `{key}` |" in page
