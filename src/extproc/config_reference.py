"""The configuration reference and JSON Schema, generated from the pydantic models in
``config.py`` (``extproc schema``): every key with its type, default and description, so the
documentation cannot drift from the code (a test compares ``docs/configuration.md`` and
``docs/config.schema.json`` with what this writes, and fails on a key without a description).
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import Config

PIPE = "\\|"  # a | inside a Markdown table cell
HEADER = """# Configuration reference

Every key of the YAML file `extproc check`, `extproc serve` and `extproc up` read, generated
from the pydantic models in `src/extproc/config.py` by `extproc schema --reference` (a test
keeps this page in step with the code). `extproc schema` prints the same as a JSON Schema
(`docs/config.schema.json`), which editors use for completion and checks: the example configs
start with `# yaml-language-server: $schema=../docs/config.schema.json`.

Types: `a | b` is either; `list[x]` a YAML list; `{name: x}` a mapping from names you choose;
"section" a nested mapping described in its own table. "required" has no default.
"""


def _models(ann: Any) -> list[type[BaseModel]]:
    """The models a field's type holds (directly, in a list, a mapping or a union)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for arg in typing.get_args(ann) for m in _models(arg)]


def _type(ann: Any) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args)
    if origin is list:
        return f"list[{_type(args[0])}]"
    if origin is dict:
        return f"{{name: {_type(args[1])}}}"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "section"
    if ann is type(None):
        return "null"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(
        ann, getattr(ann, "__name__", str(ann)))


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return ""
    text = json.dumps(value, default=str)
    return f"`{text if len(text) <= 40 else text[:37] + '...'}`"


def _walk(model: type[BaseModel], path: str, out: list[tuple[str, type[BaseModel]]]) -> None:
    out.append((path, model))
    for name, field in model.model_fields.items():
        for sub in _models(field.annotation):
            origin = typing.get_origin(field.annotation)
            inner = typing.get_origin(typing.get_args(field.annotation)[0]) \
                if typing.get_args(field.annotation) else None
            suffix = "[]" if list in (origin, inner) else ".<name>" \
                if dict in (origin, inner) else ""
            _walk(sub, f"{path}.{name}{suffix}".lstrip("."), out)


def sections() -> list[tuple[str, type[BaseModel]]]:
    out: list[tuple[str, type[BaseModel]]] = []
    _walk(Config, "", out)
    return out


def _doc(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").split())


def undocumented() -> list[str]:
    """Keys without a description (a nested section counts its class's docstring)."""
    missing = []
    for path, model in sections():
        for name, field in model.model_fields.items():
            subs = _models(field.annotation)
            if not field.description and not (subs and all(_doc(m) for m in subs)):
                missing.append(f"{path}.{name}".lstrip("."))
    return missing


def reference() -> str:
    """The reference page (Markdown)."""
    lines = [HEADER]
    for path, model in sections():
        lines += [f"## `{path or '(top level)'}`", "", _doc(model), "",
                  "| key | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            subs = _models(field.annotation)
            desc = (field.description or " ".join(_doc(m) for m in subs)).replace("|", PIPE)
            lines.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | "
                         f"{desc} |")
        lines.append("")
    return "\n".join(lines)


def json_schema() -> str:
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "llm-extproc configuration"
    return json.dumps(schema, indent=1, sort_keys=True) + "\n"
