"""The README is a front page: short, and every page in docs/ is reachable from it; no
relative link in the README or the docs points at a file that is not there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_is_a_front_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    linked = {Path(target).name for target in LINK.findall(readme)
              if target.startswith("docs/")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"not linked from the README: {sorted(pages - linked)}"


def test_relative_links_resolve() -> None:
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


def test_the_grafana_dashboard_queries_metrics_we_export() -> None:
    import json

    from extproc.metrics import REGISTRY

    names = set()
    for family in REGISTRY.collect():
        names |= {family.name, f"{family.name}_total", f"{family.name}_bucket",
                  f"{family.name}_sum", f"{family.name}_count"}
    dash = json.loads((ROOT / "deploy" / "grafana" / "llm-extproc.json").read_text())
    queried = {m for p in dash["panels"] for t in p["targets"]
               for m in re.findall(r"\b((?:llm_extproc|gen_ai)_[a-z_]+)(?=[\[{])", t["expr"])}
    assert queried and queried <= names, queried - names
