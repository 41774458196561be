"""Every YAML example in the README and docs/ parses, and those that are broker configurations
validate as one (with their ${VAR}s set), so the documentation shows nothing the broker refuses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from broker.config import parse

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"```ya?ml\n(.*?)```", re.S)
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def examples() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for index, match in enumerate(BLOCK.finditer(doc.read_text())):
            found.append((f"{doc.relative_to(ROOT)}#{index + 1}", match.group(1)))
    return found


@pytest.mark.parametrize(("where", "text"), examples(), ids=[w for w, _ in examples()])
def test_yaml_examples_parse(where: str, text: str) -> None:
    data = yaml.safe_load(text)
    if isinstance(data, dict) and "issuer" in data and "resources" in data:
        env = {name: "x" * 40 for name in VAR.findall(text)}
        parse(data, env=env, base_dir=str(ROOT))  # raises ConfigError naming the key paths


PYTHON = re.compile(r"```python\n(.*?)```", re.S)
# A path inside the repository, as the docs name one: `docs/cimd.md`, broker/flow.py, tests/e2e/.
PATH = re.compile(
    r"(?<![\w/.:-])((?:docs|broker|providers|tests|bench|migrations|\.ci)/[\w./-]*[\w/])"
)
LINK = re.compile(r"\]\((?!https?:|#|mailto:)([\w.][^)#\s]*)\)")
GENERATED = ("tests/artifacts",)  # written by the suite (screenshots, conformance results)


def python_examples() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for index, match in enumerate(PYTHON.finditer(doc.read_text())):
            found.append((f"{doc.relative_to(ROOT)}#py{index + 1}", match.group(1)))
    return found


@pytest.mark.parametrize(
    ("where", "text"), python_examples(), ids=[w for w, _ in python_examples()]
)
def test_python_examples_compile(where: str, text: str) -> None:
    compile(text, where, "exec")


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_file_the_docs_name_exists(doc: Path) -> None:
    text = doc.read_text()
    named = {m.group(1) for m in PATH.finditer(text) if not m.group(1).startswith(GENERATED)}
    # A path in docs/ may be relative to the page (providers/github.md) or to the repository.
    missing = sorted(p for p in named if not (ROOT / p).exists() and not (doc.parent / p).exists())
    linked = {m.group(1) for m in LINK.finditer(text)}
    missing += sorted(p for p in linked if not (doc.parent / p).exists())
    assert not missing, f"{doc.relative_to(ROOT)} names files that do not exist: {missing}"
