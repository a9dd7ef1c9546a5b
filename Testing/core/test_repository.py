"""Project rules that keep the core portable and CI honest."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
    published = [m for m in cat if m.repo_id]
    assert len(published) >= 3
    for m in cat:
        assert m.title and m.task
        if m.repo_id:  # published on the Hugging Face hub: a pinned revision and the files to fetch
            assert m.revision and {"config.json", "model.safetensors"} <= set(m.file_names)
        else:  # a task users train with CTFMTrain: nothing to download, but its labels are known
            assert not m.revision and not m.files and m.task == "segmentation" and m.labels


def test_catalogue_user_models_say_how_to_get_them():
    import json

    raw = json.loads((ROOT / "Resources" / "Models.json").read_text())["models"]
    user = [m for m in raw if not m.get("repo_id")]
    assert {m["id"] for m in user} >= {"msd_lung_tumor", "msd_liver_tumor", "msd_pancreas_tumor",
                                       "msd_hepatic_vessel_tumor", "kits_kidney_tumor", "autopet_lesion"}
    for m in user:
        assert m["source"] == "user"
        assert "ctfm train segment --config" in m["how_to"] and f"ctfm models import FOLDER --id {m['id']}" in m["how_to"]
