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
