"""The pure-Python twins keep the native public API, signature for signature."""

from __future__ import annotations

import importlib
import inspect

import pytest

import buttress
import buttress.reference

# native module -> twin module, for modules whose every public function is mirrored
MODULE_TWINS = [("buttress._hash", "buttress.reference.hashing")]


def signature_of(func: object) -> list[tuple[str, object, object]]:
    """Parameter names, kinds and defaults: what callers depend on (annotations aside)."""
    parameters = inspect.signature(func).parameters.values()  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default) for p in parameters]


@pytest.mark.parametrize(("native_name", "twin_name"), MODULE_TWINS)
def test_module_twins_have_the_same_functions_and_signatures(native_name, twin_name):
    native = importlib.import_module(native_name)
    twin = importlib.import_module(twin_name)
    native_api = {n for n in dir(native) if not n.startswith("_") and callable(getattr(native, n))
                  and n in getattr(twin, "__all__", ())} | set(getattr(twin, "__all__", ()))
    for name in sorted(native_api):
        assert hasattr(native, name), f"{native_name} lacks {name}"
        assert hasattr(twin, name), f"{twin_name} lacks {name}"
        assert signature_of(getattr(native, name)) == signature_of(getattr(twin, name)), name


@pytest.mark.parametrize("name", buttress.reference.__all__)
def test_every_twin_in_reference_mirrors_a_top_level_name(name):
    twin = getattr(buttress.reference, name)
    native = getattr(buttress, name)
    if inspect.isclass(twin):
        assert inspect.isclass(native)
        members = {m for m in dir(twin) if not m.startswith("_")} | {"__init__"}
        for member in sorted(members):
            assert hasattr(native, member), f"{name}.{member} missing in native"
            native_member, twin_member = getattr(native, member), getattr(twin, member)
            if callable(twin_member) and not inspect.isclass(twin_member):
                assert signature_of(native_member) == signature_of(twin_member), (
                    f"{name}.{member}"
                )
        native_public = {m for m in dir(native) if not m.startswith("_")}
        assert native_public == members - {"__init__"}, f"{name}: public members differ"
    else:
        assert signature_of(native) == signature_of(twin)


def test_top_level_exports_resolve():
    for name in buttress.__all__:
        try:
            getattr(buttress, name)
        except ImportError as exc:  # a component not yet installed is reported by name
            pytest.fail(f"buttress.{name} does not import: {exc}")


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = buttress.no_such_thing
