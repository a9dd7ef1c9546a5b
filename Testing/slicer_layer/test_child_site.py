"""The packages only ``ctfm`` children use (DICOM writers: highdicom and its pydicom 3) live in a private folder
that children put first on their path and Slicer's own Python never sees: Slicer 5.6-5.10 bundle pydicom 2.4
under their DICOM module (CTFMSlicer.dependencies.child_site, CTFMSlicer.process.ProcessRunner)."""

import importlib.util
import os
import sys
import textwrap

import pytest

from CTFMSlicer import dependencies
from CTFMSlicer.process import ProcessRunner


def fake_distribution(site, name: str, version: str) -> None:
    """What pip --target leaves for an installed distribution: a .dist-info folder with its METADATA."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.setenv("CTFM_CACHE", str(tmp_path / "home"))
    return dependencies.child_site()


def test_the_child_site_is_per_python_version_under_the_ctfm_folder(site, tmp_path):
    assert site.parent == tmp_path / "home"
    assert site.name == f"child-site-py{sys.version_info.major}{sys.version_info.minor}"


def test_only_what_the_child_site_holds_counts(site):
    requirements = dependencies.read_requirements(dependencies.CHILD_REQUIREMENTS_FILE)
    assert {r.split(">=")[0] for r in requirements} == {"highdicom", "pydicom", "pyjpegls"}
    # This Python has highdicom and pydicom 3 (the test environment), yet the empty site lacks them all.
    assert importlib.util.find_spec("highdicom") is not None
    assert dependencies.missing_child_requirements(requirements, site) == requirements
    fake_distribution(site, "highdicom", "0.28.2")
    fake_distribution(site, "pydicom", "2.4.4")  # too old for highdicom's LABELMAP
    fake_distribution(site, "pyjpegls", "1.5.1")
    assert dependencies.missing_child_requirements(requirements, site) == ["pydicom>=3.0.1"]


def test_the_install_goes_into_the_site_without_dependencies(site, tmp_path):
    requirements = tmp_path / "requirements-child.txt"
    # pydicom 3 is in this Python (the test environment): a child would import it, so it is not installed again.
    requirements.write_text("# only for the children\npydicom>=3.0.1\nctfm-child-probe>=1.0\n", encoding="utf-8")
    calls = []
    dependencies.ensure_child_packages(requirements_path=requirements, site=site, install=calls.append)
    assert calls == [["--target", str(site), "--no-deps", "--upgrade", "ctfm-child-probe>=1.0"]]
    fake_distribution(site, "ctfm-child-probe", "1.2")
    dependencies.ensure_child_packages(requirements_path=requirements, site=site, install=calls.append)
    assert len(calls) == 1  # nothing missing: pip is not run again


def test_a_child_imports_from_the_site_first_and_this_process_does_not(site):
    site.mkdir(parents=True)
    (site / "ctfm_child_probe.py").write_text("WHERE = 'child site'\n", encoding="utf-8")
    code = textwrap.dedent("""
        import sys
        import ctfm_child_probe
        print(ctfm_child_probe.WHERE, sys.path.index(sys.argv[1]) < sys.path.index(sys.argv[2]))
    """)
    import CTFMLib

    ctfmlib_parent = os.path.dirname(os.path.dirname(CTFMLib.__file__))
    lines = []
    runner = ProcessRunner([sys.executable, "-c", code, str(site), ctfmlib_parent],
                           on_line=lambda stream, text: lines.append((stream, text)))
    assert runner.wait(timeout=30).ok, lines
    assert ("stdout", "child site True") in lines
    assert importlib.util.find_spec("ctfm_child_probe") is None


def test_without_a_site_the_child_path_is_as_before(site):
    lines = []
    runner = ProcessRunner([sys.executable, "-c", "import os; print(os.environ['PYTHONPATH'])"],
                           on_line=lambda stream, text: lines.append((stream, text)))
    assert runner.wait(timeout=30).ok, lines
    assert str(site) not in lines[0][1].split(os.pathsep)
