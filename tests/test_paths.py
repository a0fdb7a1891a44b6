"""Tests for the pure output-path naming."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cometbatch.paths import EXTENSIONS, MAX_COMPONENT, image_relpath, safe_component

SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {
    f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)
}

DANGEROUS_IDS = [
    "../../etc/x",
    "/etc/passwd",
    "..",
    ".",
    "a\x00b",
    "CON",
    "con",
    "nul.txt",
    "LPT9.tar.gz",
    "C:\\x",
    "\\\\server\\share",
    "",
    "x" * 500,
    ".hidden",
    "trailing.",
    "trailing ",
    "tab\there",
    "new\nline",
    "caf\u00e9",
    "\U0001f431",
    "\ud800",
    "a/b",
    "...",
]


def assert_safe(name: str) -> None:
    """Assert every property a folder name under OUT/images/ must have."""
    assert SAFE_NAME.fullmatch(name), name
    assert name not in (".", "..")
    assert not name.startswith(".")
    assert not name.endswith((".", " "))
    assert name.split(".", 1)[0].upper() not in WINDOWS_RESERVED
    assert 0 < len(name) <= MAX_COMPONENT


@pytest.mark.parametrize("job_id", ["cat-01", "job_7.v2", "A", "0", "a.b.c", "x" * MAX_COMPONENT])
def test_ordinary_ids_are_unchanged(job_id: str) -> None:
    """An id that is already a safe name is used as the folder name as it is."""
    assert safe_component(job_id) == job_id


@pytest.mark.parametrize("job_id", DANGEROUS_IDS)
def test_dangerous_ids_become_safe_names_with_a_hash(job_id: str) -> None:
    """A dangerous id becomes a safe name that ends with a hash of the original id."""
    name = safe_component(job_id)
    assert_safe(name)
    assert name != job_id
    assert re.search(r"-[0-9a-f]{8}$", name)


@pytest.mark.parametrize("job_id", DANGEROUS_IDS)
def test_dangerous_ids_stay_inside_images(job_id: str, tmp_path: Path) -> None:
    """The image path of a dangerous id resolves to a file directly in its own folder."""
    images = (tmp_path / "images").resolve()
    target = (tmp_path / image_relpath(job_id, 0, "png")).resolve()
    assert target.parent.parent == images


def test_distinct_ids_never_share_a_folder() -> None:
    """Ids that sanitize to the same text still get different folders."""
    ids = ["a/b", "a_b", "a\\b", "a b", "a\x00b", "", "_", ".", "..", "CON", "con", "Con_"]
    names = [safe_component(i) for i in ids]
    assert len(set(names)) == len(ids)


def test_names_are_stable() -> None:
    """The same id always maps to the same folder, so resumed runs find their files."""
    assert safe_component("a/b") == safe_component("a/b")
    assert safe_component("a/b").startswith("a_b-")


def test_long_ids_are_capped() -> None:
    """A 500-character id is cut to the length cap, keeping its start and a hash."""
    name = safe_component("x" * 500)
    assert len(name) == MAX_COMPONENT
    assert name.startswith("x" * 60)


def test_reserved_name_with_extension_is_renamed() -> None:
    """A Windows device name stays reserved with an extension, so its stem changes."""
    name = safe_component("nul.txt")
    assert name.startswith("nul_.txt-")


def test_image_relpath_uses_posix_separators_and_extension_table() -> None:
    """The relative path is images/<id>/<index>.<ext> with the table's extension."""
    assert image_relpath("cat-01", 0, "png") == "images/cat-01/0.png"
    assert image_relpath("cat-01", 3, "jpeg") == "images/cat-01/3.jpg"
    assert image_relpath("cat-01", 12, "webp") == "images/cat-01/12.webp"
    assert EXTENSIONS == {"png": "png", "jpeg": "jpg", "webp": "webp"}


@pytest.mark.parametrize("index", [-1, True, 1.0, "0"])
def test_image_relpath_rejects_bad_indexes(index: object) -> None:
    """An index that is not a non-negative int is a programming error."""
    with pytest.raises(ValueError, match="index"):
        image_relpath("a", index, "png")  # type: ignore[arg-type]


def test_image_relpath_rejects_unknown_formats() -> None:
    """Only formats with a known extension can be named."""
    with pytest.raises(ValueError, match="gif"):
        image_relpath("a", 0, "gif")


@pytest.fixture(scope="module")
def out_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output folder shared by the property test's examples."""
    return tmp_path_factory.mktemp("out")


@given(job_id=st.text(), index=st.integers(min_value=0, max_value=10**6))
def test_any_id_stays_three_levels_inside_images(out_root: Path, job_id: str, index: int) -> None:
    """For any id, OUT / image_relpath resolves inside OUT/images, exactly three levels deep."""
    rel = image_relpath(job_id, index, "png")
    images = (out_root / "images").resolve()
    target = (out_root / rel).resolve()
    assert target.relative_to(out_root.resolve()).parts[0] == "images"
    assert target.parent.parent == images
    assert len(PurePosixPath(rel).parts) == 3
    # The same path must mean the same place on Windows too.
    assert len(PureWindowsPath(rel).parts) == 3
    assert_safe(PurePosixPath(rel).parts[1])
