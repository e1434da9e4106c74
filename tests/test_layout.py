"""The package's layout: imports point down the floors, never in a circle; private Lightning names live in compat.py."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "senet_pl"

# Floors, bottom up: a module may import from its own floor or below, never from above.
FLOORS = {
    "senet_pl.files": 0, "senet_pl.schedule": 0, "senet_pl.model": 0, "senet_pl.gates": 0, "senet_pl.precision": 0, "senet_pl.images": 0,
    "senet_pl.compat": 0, "senet_pl.slurm": 0, "senet_pl.plots": 0, "senet_pl.infer": 0,
    "senet_pl.module": 1, "senet_pl.ema": 1, "senet_pl.data": 1, "senet_pl.checkpoints": 1,
    "senet_pl.callbacks": 2, "senet_pl.export": 2,
    "senet_pl.untrusted": 3, "senet_pl.resume": 3, "senet_pl.runs": 3, "senet_pl.options": 3, "senet_pl.cli": 3, "senet_pl.trainer": 3, "senet_pl.__main__": 3, "senet_pl": 3,
    "senet_pl.tools": 4,
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    """senet_pl modules imported anywhere in the file (function-level imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("senet_pl"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("senet_pl"))
    return names


def _floor(module: str) -> int:
    while module not in FLOORS:
        module = module.rsplit(".", 1)[0]
    return FLOORS[module]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_cycle() -> None:
    graph = _graph()
    # a package's __init__ re-exports its parts: an edge from a part to its own package is a cycle too
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError(" -> ".join([*trail[trail.index(nxt):], nxt]) if nxt in trail else f"{node} -> {nxt}")
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_imports_point_down_the_floors() -> None:
    upward = [f"{a} -> {b}" for a, targets in _graph().items() for b in targets
              if _floor(b) > _floor(a) and not b.startswith(a + ".")]
    assert not upward, upward


@pytest.mark.parametrize("module", ["senet_pl.model", "senet_pl.gates"])
def test_the_model_floor_is_plain_pytorch(module: str) -> None:
    source = _modules()[module].read_text()
    assert "lightning" not in source.replace("Lightning", "")


PRIVATE = ["_parse_ckpt_path", "_run_subcommand", "_PATH", "_signal_connector",
           "_batches_that_stepped", "batch_progress", "epoch_loop",
           "_logger_connector", "_optimizer_handles_unscaling"]


def test_private_lightning_names_only_in_compat() -> None:
    found = [f"{path.name}: {name}" for path in PACKAGE.rglob("*.py") if path.name != "compat.py"
             for name in PRIVATE if name in path.read_text()]
    assert not found, found


def test_no_module_is_longer_than_about_300_lines() -> None:  # "about": 330 at most
    long = {p.name: n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 330}
    assert not long, long
