"""The package's public names: lazy, complete, and each the object its module defines."""
import importlib

import pytest

import uge


def test_every_public_name_resolves_to_its_module_object():
    assert set(uge.__all__) == set(uge._WHERE)
    for name in uge.__all__:
        module = importlib.import_module(f"uge.{uge._WHERE[name]}")
        assert getattr(uge, name) is getattr(module, name)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        uge.nope  # noqa: B018


def test_imports_only_point_down_the_layers():
    """scripts/import_graph.py's layers: no module imports one from a higher layer, no cycle between parts."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("import_graph", root / "scripts" / "import_graph.py")
    graph = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(graph)
    assert graph.report(root / "src") == ([], [])
    assert len(graph.edges(root / "src")) > 100  # it really read the package
