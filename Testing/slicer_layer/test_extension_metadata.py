"""What ships with the extension: the Extensions Index entry, CMake metadata, LICENSE, CHANGELOG, one version.

The Extensions Index entry (``Resources/ExtensionsIndex/CTFM.json``) is the file to submit
to https://github.com/Slicer/ExtensionsIndex as ``CTFM.json``. It is checked the way that
repository checks a submission (``scripts/check_description_files.py``, ``.pre-commit-config.yaml``):
against Slicer's catalog-entry JSON schema (v1.0.2, whose rules are restated below, since the
schema is not downloaded here), file name = CMake ``project()`` name, LF line endings, a known
category, an https ``scm_url`` whose repository name starts with ``Slicer``, icon and
screenshot URLs in the top-level ``CMakeLists.txt``, and a license file at the root. The entry
holds no homepage, icon or screenshots (the schema allows no other keys): Slicer reads those
from ``CMakeLists.txt``, whose raw GitHub URLs must name files in this repository.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[2]
INDEX_ENTRY = REPO / "Resources" / "ExtensionsIndex" / "CTFM.json"
GITHUB_REPO = "project-lighter/SlicerCTFM"
BRANCH = "main"

# https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json
# (v1.0.1 differs only by lacking dicom_support_rule); restated: required keys, and every allowed key's type.
SCHEMA_IDS = {
    f"https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v{v}.json#"
    for v in ("1.0.1", "1.0.2")
}
SCHEMA_REQUIRED = {"$schema", "category", "scm_url"}
SCHEMA_TYPES = {
    "$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
    "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str,
    "enabled": bool, "tier": int,
}
SEMVER = re.compile(r"\d+\.\d+\.\d+(?:[-+][0-9A-Za-z.-]+)?")


def cmake_metadata() -> dict:
    """``set(EXTENSION_X "value")`` lines of the top-level CMakeLists.txt, and ``project()``'s name as ``PROJECT``."""
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    meta = {m.group(1): m.group(2) for m in re.finditer(r'^\s*set\s*\(\s*(EXTENSION_\w+)\s+"([^"]*)"\s*\)', text, re.M)}
    meta["PROJECT"] = re.search(r"^\s*project\s*\(\s*([^\s)]+)", text, re.M | re.I).group(1)
    return meta


def index_entry() -> dict:
    return json.loads(INDEX_ENTRY.read_text(encoding="utf-8"))


def repo_file_for_url(url: str) -> Path:
    """The file of this repository a URL names: raw GitHub content on the branch, or the repository page itself."""
    parts = urlsplit(url)
    assert parts.scheme == "https" and not parts.query and not parts.fragment, url
    path = parts.path.strip("/")
    if parts.netloc == "raw.githubusercontent.com":
        prefix = f"{GITHUB_REPO}/{BRANCH}/"
        assert path.startswith(prefix), f"{url} is not a file on {GITHUB_REPO}'s {BRANCH} branch"
        return REPO / path[len(prefix):]
    assert parts.netloc == "github.com", url
    path = path.removesuffix(".git")
    assert path == GITHUB_REPO or path.startswith((f"{GITHUB_REPO}/blob/{BRANCH}/", f"{GITHUB_REPO}/tree/{BRANCH}/")), \
        f"{url} is not {GITHUB_REPO} on {BRANCH}"
    rest = path[len(GITHUB_REPO):].split("/", 3)[3:] if path != GITHUB_REPO else []
    return REPO.joinpath(*rest) if rest else REPO


def png_size(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# --- the Extensions Index entry ------------------------------------------------------------------


def test_index_entry_follows_the_catalog_entry_schema():
    raw = INDEX_ENTRY.read_bytes()
    assert b"\r" not in raw and b"\t" not in raw and raw.endswith(b"\n"), "LF line endings, no tabs, final newline"
    entry = index_entry()
    assert isinstance(entry, dict)
    assert SCHEMA_REQUIRED <= set(entry), f"missing {SCHEMA_REQUIRED - set(entry)}"
    assert set(entry) <= set(SCHEMA_TYPES), f"keys the schema does not allow: {set(entry) - set(SCHEMA_TYPES)}"
    for key, value in entry.items():
        assert isinstance(value, SCHEMA_TYPES[key]) and not (SCHEMA_TYPES[key] is int and isinstance(value, bool)), key
    assert entry["$schema"] in SCHEMA_IDS
    assert all(isinstance(d, str) and d for d in entry.get("build_dependencies", []))
    assert entry.get("scm_type", "git") in {"git", "local"}
    assert 1 <= entry.get("tier", 1) <= 5
    assert entry.get("build_subdirectory", ".") == "."  # not a superbuild


def test_index_entry_matches_cmake_and_names_pytorch():
    entry, meta = index_entry(), cmake_metadata()
    assert INDEX_ENTRY.stem == meta["PROJECT"] == "CTFM"  # the index names the file after project()
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["build_dependencies"] == meta["EXTENSION_DEPENDS"].split()
    assert entry["category"] == meta["EXTENSION_CATEGORY"] == "Segmentation"
    assert entry["scm_revision"] == BRANCH  # a branch, so the raw URLs below name the files it builds


def test_index_entry_repository_is_this_one():
    entry, meta = index_entry(), cmake_metadata()
    url = entry["scm_url"]
    assert urlsplit(url).scheme in {"https", "git"}
    assert repo_file_for_url(url) == REPO
    repo_name = urlsplit(url).path.rstrip("/").split("/")[-1].removesuffix(".git")
    assert repo_name.startswith("Slicer") and not INDEX_ENTRY.stem.lower().startswith("slicer")
    assert url.removesuffix(".git") == meta["EXTENSION_HOMEPAGE"]


# --- CMake metadata ------------------------------------------------------------------------------


def test_cmake_has_the_template_metadata():
    meta = cmake_metadata()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS", "EXTENSION_VERSION"):
        assert meta.get(key, "").strip(), f"{key} is not set in CMakeLists.txt"
    description = meta["EXTENSION_DESCRIPTION"]
    assert ";" not in description  # a CMake list separator: Slicer passes the description unquoted
    assert "CT-FM" in description and len(description) < 400


def test_every_url_in_the_metadata_names_a_file_here():
    meta = cmake_metadata()
    urls = [meta["EXTENSION_HOMEPAGE"], meta["EXTENSION_ICONURL"], *meta["EXTENSION_SCREENSHOTURLS"].split(),
            index_entry()["scm_url"]]
    for url in urls:
        path = repo_file_for_url(url)
        assert path.exists(), f"{url} names {path.relative_to(REPO)}, which does not exist"


def test_icon_and_screenshots_are_pngs_of_sensible_size():
    meta = cmake_metadata()
    icon = repo_file_for_url(meta["EXTENSION_ICONURL"])
    assert png_size(icon) == (128, 128)  # Slicer's spec: a 128x128 png
    screenshots = meta["EXTENSION_SCREENSHOTURLS"].split()
    assert screenshots
    for url in screenshots:
        path = repo_file_for_url(url)
        width, height = png_size(path)
        assert width >= 640 and height >= 400, (path, width, height)
        assert path.stat().st_size < 600_000, f"{path} is {path.stat().st_size} bytes"


# --- license and changelog -----------------------------------------------------------------------


def test_license_is_the_apache_2_text_pyproject_names():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    for phrase in ("Apache License", "Version 2.0, January 2004",
                   "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION", "END OF TERMS AND CONDITIONS",
                   "APPENDIX: How to apply the Apache License to your work."):
        assert phrase in text
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^license\s*=\s*"Apache-2.0"', pyproject, re.M)


def changelog_releases() -> list:
    text = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    return re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?\s*$", text, re.M)


def test_changelog_lists_releases_newest_first():
    releases = [(v, d) for v, d in changelog_releases() if v != "Unreleased"]
    assert releases, "CHANGELOG.md has no release heading '## [X.Y.Z] - YYYY-MM-DD'"
    for version, date in releases:
        assert SEMVER.fullmatch(version) and date, (version, date)
    dates = [d for _, d in releases]
    assert dates == sorted(dates, reverse=True)


# --- one version ---------------------------------------------------------------------------------


def ctfm_version_from_the_command() -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "CTFM"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "CTFMLib.cli", "--version"], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120, check=True).stdout.strip()
    assert out.startswith("ctfm "), out
    return out.split()[1]


def test_one_version_everywhere():
    from CTFMLib import __version__
    from CTFMLib.catalog import Catalog

    command = ctfm_version_from_the_command()
    extension = cmake_metadata()["EXTENSION_VERSION"]
    catalogue = json.loads((REPO / "Resources" / "Models.json").read_text(encoding="utf-8"))["ctfm_version"]
    cli_xml = (REPO / "CTFMTrain" / "CTFMTrain.xml").read_text(encoding="utf-8")
    cli_module = re.search(r"<version>([^<]+)</version>", cli_xml).group(1)
    changelog = next(v for v, _ in changelog_releases() if v != "Unreleased")
    found = {"ctfm --version": command, "CTFMLib.__version__": __version__, "CMakeLists EXTENSION_VERSION": extension,
             "Models.json ctfm_version": catalogue, "CTFMTrain.xml <version>": cli_module, "CHANGELOG.md": changelog}
    assert SEMVER.fullmatch(command), command
    assert len(set(found.values())) == 1, found
    Catalog.load(REPO / "Resources" / "Models.json")  # the catalogue still loads with the extra key


@pytest.mark.parametrize("url, expected", [
    (f"https://raw.githubusercontent.com/{GITHUB_REPO}/main/Resources/CTFM.png", "Resources/CTFM.png"),
    (f"https://github.com/{GITHUB_REPO}", "."),
    (f"https://github.com/{GITHUB_REPO}.git", "."),
    (f"https://github.com/{GITHUB_REPO}/blob/main/README.md", "README.md"),
])
def test_url_mapping(url, expected):
    assert repo_file_for_url(url) == REPO / expected


@pytest.mark.parametrize("url", [
    f"https://raw.githubusercontent.com/{GITHUB_REPO}/dev/Resources/CTFM.png",  # another branch
    "https://raw.githubusercontent.com/someone/else/main/Resources/CTFM.png",
    f"http://github.com/{GITHUB_REPO}",
])
def test_url_mapping_refuses_other_places(url):
    with pytest.raises(AssertionError):
        repo_file_for_url(url)
