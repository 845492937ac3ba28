"""Who may import whom, checked on the shipped source (its imports, parsed, not run):

- producer/ and consumers/ never import each other; what they share is schemas/, the Kafka
  wing (kafka/) and the error root (xdpwatch/errors.py)
- the Kafka wing imports only xdpwatch.schemas and xdpwatch.errors (and itself)
- schemas/ and xdpwatch/errors.py import nothing of xdpwatch
- only the CLI (and `python -m xdpwatch`) imports the CLI, only the CLI the demo; nothing
  shipped imports the tests or the bench
- every import is absolute (`from xdpwatch.schemas import ...`), so a reader of the
  repository sees where a name comes from
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modules() -> dict[str, Path]:
    """Every shipped module by its installed name, from pyproject's package-dir."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found = {}
    for package, folder in dirs.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = modules()


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in `path`; a relative import as '.'."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                out.append((node.lineno, "."))
                continue
            for a in node.names:  # `from xdpwatch import schemas` imports the module xdpwatch.schemas
                sub = f"{node.module}.{a.name}"
                out.append((node.lineno, sub if sub in MODULES else node.module))
    return out


def under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def refused(owner: str, imported: str) -> str | None:
    """Why `owner` may not import `imported`, or None."""
    if imported == ".":
        return "a relative import: write it absolute"
    if under(imported, "tests", "bench"):
        return "shipped code imports the tests or the bench"
    if not under(imported, "xdpwatch"):
        return None  # the standard library, third parties
    if under(owner, "xdpwatch.producer") and under(imported, "xdpwatch.consumers"):
        return "the producer imports the consumers"
    if under(owner, "xdpwatch.consumers") and under(imported, "xdpwatch.producer"):
        return "the consumers import the producer"
    if under(owner, "xdpwatch.kafka") and not under(imported, "xdpwatch.kafka", "xdpwatch.schemas", "xdpwatch.errors"):
        return "the Kafka wing imports beyond xdpwatch.schemas and xdpwatch.errors"
    if under(owner, "xdpwatch.schemas", "xdpwatch.errors") and not under(imported, owner):
        return "the contract and the error root import nothing of xdpwatch"
    if under(imported, "xdpwatch.cli") and not under(owner, "xdpwatch.cli", "xdpwatch.__main__"):
        return "only the CLI imports the CLI"
    if under(imported, "xdpwatch.demo") and not under(owner, "xdpwatch.cli", "xdpwatch.demo"):
        return "only the CLI imports the demo"
    return None


def test_imports_follow_the_layout():
    wrong = [f"{path.relative_to(ROOT)}:{line}: {imported}: {why}"
             for owner, path in MODULES.items() for line, imported in imports(path)
             if (why := refused(owner, imported))]
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_the_tree():
    """Not vacuous: it finds the packages and the imports that matter."""
    assert {"xdpwatch.producer.exporter", "xdpwatch.consumers.base", "xdpwatch.kafka.read", "xdpwatch.schemas",
            "xdpwatch.errors", "xdpwatch.cli.produce", "xdpwatch.demo.lab"} <= set(MODULES)
    assert (MODULES["xdpwatch.producer.exporter"] == ROOT / "producer" / "exporter.py"
            and MODULES["xdpwatch.cli"] == ROOT / "xdpwatch" / "cli" / "__init__.py")
    exporter = {m for _, m in imports(MODULES["xdpwatch.producer.exporter"])}
    assert {"xdpwatch.schemas", "xdpwatch.kafka.read", "xdpwatch.producer.spool"} <= exporter
    assert refused("xdpwatch.producer.pipeline", "xdpwatch.consumers.base")
    assert refused("xdpwatch.kafka.read", "xdpwatch.producer.errors")
    assert refused("xdpwatch.consumers.alert", ".")
    assert refused("xdpwatch.kafka.read", "xdpwatch.schemas") is None
