#!/usr/bin/env python3
"""The library's module graph goes one way: each module imports only from the layers below
its own, and the units of one layer import each other without a cycle.

Layers, bottom up (crates/linattn/src):
  base/                         element and tensor types, problem, errors, memory
  backend/cpu/, backend/cuda/   the kernels
  engine/                       kernelized attention: feature maps, forms, states
  methods/{method,info,options,reference}.rs
                                what every method implements and is described by
  methods/<name>/               one folder per method (units of one layer)
  methods/{mod,catalogue}.rs    the Method enum, its dispatch, the catalogue
  api/                          the public API
  lib.rs                        re-exports

Every `crate::` and `super::` path in the source is an edge from the file's unit to the
unit the path names. Exits 1 and names each offending edge or cycle.
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent / "crates" / "linattn" / "src"
METHOD_CORE = {"method", "info", "options", "reference"}
LAYERS = ["base", "backend", "engine", "methods::core", "methods::<name>", "methods", "api", "lib"]


def module_path(file: pathlib.Path) -> list[str]:
    """The module path of a source file: src/methods/softmax/mod.rs -> [methods, softmax]."""
    parts = list(file.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] in ("mod", "lib"):
        parts.pop()
    return parts


def unit(path: list[str]) -> str | None:
    """The unit a module path belongs to (None: the crate root or an external item)."""
    if not path:
        return "lib"
    top = path[0]
    if top == "base" or top == "engine" or top == "api":
        return top
    if top == "backend":
        return f"backend::{path[1]}" if len(path) > 1 and path[1] in ("cpu", "cuda") else "backend"
    if top == "methods":
        if len(path) == 1 or path[1] == "catalogue":
            return "methods"
        if path[1] in METHOD_CORE:
            return "methods::core"
        return f"methods::{path[1]}"
    return None


def layer(u: str) -> int:
    if u.startswith("backend"):
        return LAYERS.index("backend")
    if u.startswith("methods::") and u != "methods::core":
        return LAYERS.index("methods::<name>")
    return LAYERS.index(u)


def paths_in(text: str) -> list[tuple[str, str]]:
    """(kind, path) of every `crate::a::b` and `super::a` path, `use` groups expanded to
    their leading segments."""
    text = re.sub(r"//[^\n]*", "", text)
    found = []
    for match in re.finditer(r"\b(crate|super)((?:::\s*(?:super|[A-Za-z_][A-Za-z0-9_]*))+)", text):
        segments = [s.strip() for s in match.group(2).split("::") if s.strip()]
        found.append((match.group(1), segments))
    return found


def resolve(kind: str, segments: list[str], here: list[str]) -> list[str]:
    if kind == "crate":
        return segments
    # `super` is the parent of the file's module (of a mod.rs: of its directory's).
    base = here[:-1]
    rest = segments
    while rest and rest[0] == "super":
        base = base[:-1]
        rest = rest[1:]
    return base + rest


def main() -> int:
    problems = []
    edges: dict[str, set[str]] = {}
    files = sorted(ROOT.rglob("*.rs"))
    modules = {tuple(module_path(f)) for f in files}
    for file in files:
        here = module_path(file)
        source = unit(here)
        for kind, segments in paths_in(file.read_text()):
            target_path = resolve(kind, segments, here)
            # The module the path names: its longest prefix that is a module (the rest
            # are items).
            while target_path and tuple(target_path) not in modules:
                target_path = target_path[:-1]
            target = unit(target_path)
            if target is None or target == source or target == "lib":
                continue
            edges.setdefault(source, set()).add(target)
            if layer(target) > layer(source):
                problems.append(
                    f"{file.relative_to(ROOT)}: {source} imports {'::'.join([kind] + segments)}"
                    f" from {target}, a layer above it"
                )
    # Cycles among the units (within a layer; across layers the check above suffices).
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                problems.append("cycle: " + " -> ".join(cycle))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    units = sorted(set(edges) | {t for ts in edges.values() for t in ts})
    print(f"layers: {len(units)} units, {sum(len(t) for t in edges.values())} edges, no upward import, no cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
