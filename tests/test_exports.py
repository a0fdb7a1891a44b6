"""The public surface is exactly `cometbatch.__all__`, sorted, and every name in it exists."""

from __future__ import annotations

import cometbatch


def test_all_is_sorted_and_complete() -> None:
    """__all__ is sorted, and each name in it is defined on the package."""
    assert cometbatch.__all__ == sorted(cometbatch.__all__)
    for name in cometbatch.__all__:
        assert hasattr(cometbatch, name), name


def test_exported_members_name_their_public_module() -> None:
    """Exported classes and functions come from cometbatch's own modules (not re-exported deps)."""
    for name in cometbatch.__all__:
        member = getattr(cometbatch, name)
        module = getattr(member, "__module__", "cometbatch")
        assert module.startswith("cometbatch"), (name, module)


def test_version_comes_from_package_metadata() -> None:
    """__version__ is the installed distribution's version string."""
    from importlib.metadata import version

    assert cometbatch.__version__ == version("cometbatch")
