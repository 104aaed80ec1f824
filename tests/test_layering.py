"""Imports go one way (docs/architecture.md, "Layers"): the module import graph of ``src/activecall``, read
with ``ast`` (imports inside functions count too), has no cycle through ``playbook/``, and ``call/`` never
imports ``playbook/`` (the playbook layer sits above the call layer; the composition root hands the call
manager its ``playbook_starter``); ``sip/``, ``media/``, ``speech/`` import nothing from ``call/``,
``playbook/``, ``webrtc/``, the web layer or the composition root.  The wire protocol (``protocol/``, the
JSON shapes every layer uses) reaches nothing but base modules, even through others; the web layer
(``web/``, the twisted.web and Autobahn resources) is imported by nothing but the composition root
(``service.py``, ``tap.py``), so never by ``call/``.

Other imports from a lower layer into a higher one are listed, not failed (``python -m tests.test_layering``
prints them; so does the test run, on stdout): they are known and handled elsewhere.
"""

from __future__ import annotations

import ast
import os
import sys

from twisted.trial import unittest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
PACKAGE = "activecall"

#: lowest first; a module belongs to the layer of its longest matching prefix
LAYERS = (
    ("base", ("activecall", "activecall.logs", "activecall.metrics", "activecall.config", "activecall.audio",
              "activecall.protocol")),
    ("media, sip, speech", ("activecall.media", "activecall.sip", "activecall.speech")),
    ("call", ("activecall.call", "activecall.webrtc")),
    ("playbook", ("activecall.playbook",)),
    ("web", ("activecall.web",)),
    ("composition root", ("activecall.service", "activecall.tap", "activecall.cli", "activecall.testing")),
)


#: the media/SIP/speech layer, and what it must never import
LOW = ("activecall.media", "activecall.sip", "activecall.speech")
ABOVE_LOW = ("activecall.call", "activecall.playbook", "activecall.webrtc", "activecall.web",
             "activecall.service", "activecall.tap", "activecall.cli", "activecall.testing")

#: the only modules outside ``web/`` that may import it
WEB_IMPORTERS = ("activecall.service", "activecall.tap")


def module_files(src: str = SRC) -> dict[str, str]:
    """module name -> file, for every ``.py`` under ``src/activecall`` (a package is its ``__init__``)."""
    out = {}
    for root, _, files in os.walk(os.path.join(src, PACKAGE)):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            parts = os.path.relpath(path, src)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def import_graph(src: str = SRC) -> dict[str, set[str]]:
    """module -> the project modules it imports (``from pkg import sub`` is an edge to ``pkg.sub``)."""
    files = module_files(src)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        is_package = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in files else origin
                           for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # ``import a.b.c`` of a name inside a module
                    target = target.rpartition(".")[0]
                if target and target != module and target != PACKAGE:
                    edges.add(target)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(out)


def layer_of(module: str) -> int:
    best, rank = -1, 0
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    return rank


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) where the importer's layer is below the imported module's."""
    return sorted((a, b) for a, things in graph.items() for b in things if layer_of(a) < layer_of(b))


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


class LayeringTests(unittest.TestCase):
    def setUp(self):
        self.graph = import_graph()

    def test_the_graph_is_read(self):
        self.assertIn("activecall.playbook.runner", self.graph)
        self.assertIn("activecall.playbook.strategy", self.graph["activecall.playbook.llm_strategy"])

    def test_no_cycle_through_playbook(self):
        through = [c for c in cycles(self.graph) if any(in_package(m, "activecall.playbook") for m in c)]
        self.assertEqual(through, [])

    def test_call_never_imports_playbook(self):
        upward = sorted((a, b) for a, things in self.graph.items() if in_package(a, "activecall.call")
                        for b in things if in_package(b, "activecall.playbook"))
        self.assertEqual(upward, [])

    def test_media_sip_speech_import_nothing_above_them(self):
        """sip/, media/ and speech/ import nothing from call/, playbook/, webrtc/, the web layer or the
        composition root; what they need from above is passed in (docs/architecture.md, "Layers")."""
        upward = sorted((a, b) for a, things in self.graph.items() if any(in_package(a, p) for p in LOW)
                        for b in things if any(in_package(b, p) for p in ABOVE_LOW))
        self.assertEqual(upward, [])

    def test_protocol_reaches_only_base_modules(self):
        reached = set()
        todo = [m for m in self.graph if in_package(m, "activecall.protocol")]
        while todo:
            for b in self.graph.get(todo.pop(), ()):
                if b not in reached:
                    reached.add(b)
                    todo.append(b)
        self.assertIn("activecall.protocol.events", reached)  # commands imports events: the walk works
        self.assertEqual(sorted(m for m in reached if layer_of(m) != 0), [])

    def test_only_the_composition_root_imports_web(self):
        importers = sorted((a, b) for a, things in self.graph.items() if not in_package(a, "activecall.web")
                           for b in things if in_package(b, "activecall.web"))
        self.assertIn(("activecall.service", "activecall.web.rest"), importers)
        self.assertEqual([(a, b) for a, b in importers if a not in WEB_IMPORTERS], [])

    def test_call_never_imports_web(self):
        upward = sorted((a, b) for a, things in self.graph.items() if in_package(a, "activecall.call")
                        for b in things if in_package(b, "activecall.web"))
        self.assertEqual(upward, [])

    def test_report_other_upward_imports_and_cycles(self):
        """Not failed: printed so they stay visible until their owners fix them."""
        report(self.graph)


def report(graph, out=sys.stdout) -> None:
    names = [name for name, _ in LAYERS]
    upward = upward_imports(graph)
    print(f"\nlayers, lowest first: {' < '.join(names)}", file=out)
    print(f"upward imports ({len(upward)}):", file=out)
    for a, b in upward:
        print(f"  {a} ({names[layer_of(a)]}) -> {b} ({names[layer_of(b)]})", file=out)
    found = cycles(graph)
    print(f"import cycles ({len(found)}):", file=out)
    for component in found:
        print("  " + " <-> ".join(component), file=out)


if __name__ == "__main__":
    report(import_graph())
