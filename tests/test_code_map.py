"""The import graph of dgemma's own modules has no cycle, counting imports made inside functions
(scripts/code_map.py draws the map)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "code_map.py"


def _code_map():
    spec = importlib.util.spec_from_file_location("code_map", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_import_cycles():
    assert _code_map().scan()["cycles"] == []


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _code_map().cycles(graph) == [["a", "b", "c"]]
