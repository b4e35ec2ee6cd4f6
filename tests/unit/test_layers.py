"""The layers the package promises, checked on its imports: the service never imports the
development tools; the core is pure (no protobuf, gRPC, network client or event loop, and
nothing from the effects or the shell); the effects never reach into the shell."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "extproc"


def imports(path: Path) -> set[str]:
    """Every module a file imports (relative imports resolved), lazy ones included."""
    package = ".".join(("extproc", *path.relative_to(SRC).parent.parts))
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.add(".".join([*base, *(node.module.split(".") if node.module else [])]))
            elif node.module:
                out.add(node.module)
    return out


def modules(under: str) -> list[Path]:
    return sorted((SRC / under).rglob("*.py")) if under else sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", modules(""), ids=lambda p: str(p.relative_to(SRC)))
def test_the_service_never_imports_the_development_tools(path: Path) -> None:
    assert not {m for m in imports(path) if m.split(".")[0] == "extproc_dev"}


CORE_FORBIDDEN = ("envoy", "grpc", "google.protobuf", "httpx", "asyncio", "extproc.effects",
                  "extproc.shell", "extproc.runtime", "extproc.render")


@pytest.mark.parametrize("path", [*modules("core"), SRC / "contract.py", SRC / "config.py"],
                         ids=lambda p: str(p.relative_to(SRC)))
def test_the_core_is_pure(path: Path) -> None:
    bad = {m for m in imports(path) if any(m == f or m.startswith(f + ".")
                                           for f in CORE_FORBIDDEN)}
    assert not bad, bad


@pytest.mark.parametrize("path", modules("effects"), ids=lambda p: str(p.relative_to(SRC)))
def test_the_effects_never_reach_into_the_shell(path: Path) -> None:
    assert not {m for m in imports(path) if m.startswith(("extproc.shell", "envoy", "grpc"))}
