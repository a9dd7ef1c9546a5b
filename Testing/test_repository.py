"""Project rules that keep the core portable and CI honest."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ctfmlib_imports_no_slicer_qt_ctk_or_vtk():
    offenders = []
    for path in (ROOT / "CTFM" / "CTFMLib").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"^\s*(import|from)\s+(slicer|qt|ctk|vtk|PythonQt)\b", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_cmd = [b for b in blocks if "pytest" in b]
    assert len(test_cmd) == 1, "the README gives one test command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd[0].strip() in ci.splitlines()


def test_catalogue_lists_the_three_published_models():
    from CTFMLib.catalog import Catalog

    cat = Catalog.load(ROOT / "Resources" / "Models.json")
    repos = {m.repo_id for m in cat}
    assert {"project-lighter/ct_fm_feature_extractor", "project-lighter/ct_fm_segresnet",
            "project-lighter/whole_body_segmentation"} <= repos
    wb = cat.find("whole_body_segmentation")
    assert len(wb.labels) == 118 and wb.labels["0"] == "background" and wb.labels["5"] == "liver"
    for m in cat:
        assert m.title and m.task and m.revision and {"config.json", "model.safetensors"} <= set(m.file_names)
