#!/usr/bin/env python3
"""Fails when two top-level modules of src/ depend on each other, directly or
through others: each stage of the request path may call only those below it.

A top-level module is src/NAME.rs or src/NAME/; it depends on another when
its code (comments stripped) names `crate::OTHER` or `crate::{.., OTHER..}`.
"""
import pathlib
import re
import sys

src = pathlib.Path(__file__).resolve().parent.parent / "src"
deps = {}
for path in src.rglob("*.rs"):
    rel = path.relative_to(src)
    top = rel.parts[0].removesuffix(".rs")
    if top in ("main", "lib"):
        continue
    code = re.sub(r"//[^\n]*", "", path.read_text(encoding="utf-8"))
    named = set(re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", code))
    for group in re.findall(r"\bcrate::\{([^}]*)\}", code):
        named |= {m.split("::")[0].strip() for m in group.split(",") if m.strip()}
    deps.setdefault(top, set()).update(n for n in named if n != top)

def reaches(start, goal, seen):
    for nxt in deps.get(start, ()):
        if nxt == goal:
            return True
        if nxt not in seen:
            seen.add(nxt)
            if reaches(nxt, goal, seen):
                return True
    return False

cycles = sorted(
    f"{a} -> {b} -> ... -> {a}"
    for a in deps
    for b in deps[a]
    if b in deps and reaches(b, a, {b})
)
for line in cycles:
    print("import cycle:", line)
print(f"module layering: {len(deps)} top-level modules, {len(cycles)} cyclic edges")
sys.exit(1 if cycles else 0)
