"""Old module names kept as deprecated aliases: ``node_ocp.curvature`` -> ``node_ocp.capture``."""

import importlib
import sys

import pytest

import node_ocp
import node_ocp.capture

OLD = "node_ocp.curvature"


@pytest.fixture
def fresh_alias(monkeypatch):
    """Forget any earlier import of the alias, so that importing it runs (and warns) again."""
    if "curvature" in vars(node_ocp):  # (hasattr would import it: the package's __getattr__)
        monkeypatch.delattr(node_ocp, "curvature")
    for name in [m for m in sys.modules if m == OLD or m.startswith(OLD + ".")]:
        monkeypatch.delitem(sys.modules, name)


def test_import_of_the_old_package_warns_and_gives_the_same_objects(fresh_alias):
    with pytest.warns(DeprecationWarning, match=r"node_ocp\.curvature.*node_ocp\.capture"):
        old = importlib.import_module(OLD)
    assert old.__all__ == node_ocp.capture.__all__
    for name in node_ocp.capture.__all__:
        assert getattr(old, name) is getattr(node_ocp.capture, name)
    from node_ocp.curvature import CurvatureCapture

    assert CurvatureCapture is node_ocp.CurvatureCapture


def test_old_submodules_are_the_new_ones(fresh_alias):
    with pytest.warns(DeprecationWarning, match=r"node_ocp\.capture"):
        from node_ocp.curvature.capture import KroneckerFactors
    import node_ocp.curvature.cells
    import node_ocp.curvature.taps

    assert KroneckerFactors is node_ocp.capture.KroneckerFactors
    assert node_ocp.curvature.cells is node_ocp.capture.cells
    assert node_ocp.curvature.taps is node_ocp.capture.taps


def test_old_name_as_an_attribute_warns_at_the_caller(fresh_alias):
    with pytest.warns(DeprecationWarning, match=r"node_ocp\.capture") as caught:
        cell_maps = node_ocp.curvature.cell_maps
    assert cell_maps is node_ocp.capture.cell_maps
    assert caught[0].filename == __file__
    with pytest.raises(AttributeError):
        node_ocp.no_such_module  # noqa: B018
