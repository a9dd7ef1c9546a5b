"""The CTFMTrain scripted CLI module: its SEM XML, its argparse, its Slicer-style runs.

Slicer builds a CLI's command line from the XML (vtkSlicerCLIModuleLogic):
simple parameters as ``--flag value`` always, booleans as a bare ``--flag``
when true, file/directory/string only when not empty. The runs below build
their command lines the same way from CTFMTrain.xml, so a flag renamed on one
side only breaks them.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ctfm_testing.training import tiny_pretraining

REPO = Path(__file__).resolve().parents[2]
CLI_DIR = REPO / "CTFMTrain"
XML = CLI_DIR / "CTFMTrain.xml"
SCRIPT = CLI_DIR / "CTFMTrain.py"

# Parameter element types of SlicerExecutionModel's ModuleDescription.xsd.
SEM_PARAMETER_TYPES = {
    "integer", "integer-vector", "boolean", "boolean-vector", "float", "float-vector", "double", "double-vector",
    "string", "string-vector", "point", "pointfile", "point-vector", "region", "region-vector",
    "string-enumeration", "integer-enumeration", "float-enumeration", "double-enumeration",
    "file", "directory", "transform", "image", "geometry", "table", "measurement",
}
EXECUTABLE_HEADER = ("category", "title", "description", "version", "documentation-url", "license", "contributor")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # ModuleDescriptionParser's validVariable


def parameters():
    root = ET.parse(XML).getroot()
    for group in root.findall("parameters"):
        for element in group:
            if element.tag in ("label", "description"):
                continue
            yield element


def load_cli_module():
    spec = importlib.util.spec_from_file_location("CTFMTrain_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slicer_command_line(overrides=None):
    """The argument list Slicer would pass for the XML defaults (and ``overrides``, by parameter name)."""
    overrides = overrides or {}
    args = []
    for p in parameters():
        name, flag = p.findtext("name"), p.findtext("longflag")
        value = overrides.get(name, p.findtext("default") or "")
        if p.tag == "boolean":
            if str(value).lower() == "true":
                args.append(f"--{flag}")
        elif p.tag in ("file", "directory", "string"):
            if value:
                args += [f"--{flag}", str(value)]
        else:
            args += [f"--{flag}", str(value)]
    return args


def run_cli(args, env=None, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout, check=False)


def filter_progress(stdout: str):
    return [float(v) for v in re.findall(r"<filter-progress>([0-9.]+)</filter-progress>", stdout)]


# --- the XML ---------------------------------------------------------------------------


def test_xml_is_a_sem_description():
    root = ET.parse(XML).getroot()
    assert root.tag == "executable"
    header = [child.tag for child in root if child.tag in EXECUTABLE_HEADER]
    assert header == list(EXECUTABLE_HEADER)  # the order the XSD's sequence prescribes
    assert root.findtext("category") == "CT-FM"
    assert all((root.findtext(tag) or "").strip() for tag in EXECUTABLE_HEADER if tag != "license") and root.find("license") is not None
    assert root.findall("parameters") and all(g.findtext("label") for g in root.findall("parameters"))


def test_xml_parameters_are_valid_sem_parameters():
    names, flags = set(), set()
    for p in parameters():
        assert p.tag in SEM_PARAMETER_TYPES, p.tag
        name, longflag, flag = p.findtext("name"), p.findtext("longflag"), p.findtext("flag")
        assert name and IDENTIFIER.match(name) and name not in names
        names.add(name)
        assert p.findtext("label") and p.findtext("description")
        assert longflag or flag or p.findtext("index"), f"{name}: no flag and no index"
        if longflag:
            assert IDENTIFIER.match(longflag.lstrip("-")) and longflag not in flags
            flags.add(longflag)
        if flag:
            assert len(flag.lstrip("-")) == 1
        if p.findtext("index") is not None:
            assert not (longflag or flag), f"{name}: <index> and a flag exclude each other"
        if p.tag in ("file", "directory", "image", "transform", "geometry", "table", "measurement", "pointfile"):
            assert p.findtext("channel") in ("input", "output"), f"{name}: needs <channel>"
        if p.tag.endswith("-enumeration"):
            elements = [e.text for e in p.findall("element")]
            assert elements and p.findtext("default") in elements
        if p.tag == "boolean":
            assert p.findtext("default") in ("true", "false")
        if p.tag == "integer":
            int(p.findtext("default"))
            constraints = p.find("constraints")
            if constraints is not None:
                assert float(constraints.findtext("minimum")) <= int(p.findtext("default")) <= float(constraints.findtext("maximum"))


def test_xml_offers_the_specified_parameters():
    by_name = {p.findtext("name"): p for p in parameters()}
    assert by_name["task"].tag == "string-enumeration"
    assert {"pretrain", "segment", "classify"} <= {e.text for e in by_name["task"].findall("element")}
    assert by_name["configFile"].tag == "file" and by_name["configFile"].findtext("channel") == "input"
    assert by_name["outputDirectory"].tag == "directory" and by_name["outputDirectory"].findtext("channel") == "output"
    assert by_name["device"].tag == "string-enumeration"
    assert [e.text for e in by_name["device"].findall("element")] == ["auto", "cpu", "cuda", "mps"]
    assert by_name["resume"].tag == "boolean"
    assert by_name["maxSteps"].tag == "integer"


# --- XML <-> argparse ----------------------------------------------------------------------


def sample_value(p):
    if p.tag.endswith("-enumeration"):
        return [e.text for e in p.findall("element")][-1]
    return {"integer": "7", "file": "config.json", "directory": "out", "string": "x"}.get(p.tag)


def test_every_xml_flag_is_accepted_by_the_script():
    parser = load_cli_module().build_parser()
    for p in parameters():
        flag = f"--{p.findtext('longflag')}"
        args = [flag] if p.tag == "boolean" else [flag, sample_value(p)]
        parsed = vars(parser.parse_args(args))
        assert parsed, flag
        if p.tag != "boolean":
            assert sample_value(p) in [str(v) for v in parsed.values()], f"{flag} did not reach the parsed arguments"
        else:
            assert True in parsed.values()


def test_enumerations_match_argparse_choices():
    parser = load_cli_module().build_parser()
    choices = {a.option_strings[0]: list(a.choices) for a in parser._actions if a.choices}
    for p in parameters():
        if p.tag.endswith("-enumeration"):
            assert choices[f"--{p.findtext('longflag')}"] == [e.text for e in p.findall("element")]


def test_help_lists_every_flag():
    result = run_cli(["--help"])
    assert result.returncode == 0
    for p in parameters():
        assert f"--{p.findtext('longflag')}" in result.stdout


def test_xml_flag_prints_the_description():
    result = run_cli(["--xml"])
    assert result.returncode == 0
    assert ET.fromstring(result.stdout).findtext("title") == ET.parse(XML).getroot().findtext("title")


def test_bad_values_are_rejected():
    assert run_cli(["--task", "dance"]).returncode == 2
    assert run_cli(["--maxSteps", "-5"]).returncode == 2


# --- runs ------------------------------------------------------------------------------------


def test_check_task_reports_filter_progress(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "out"
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"epochs": 1}))
    result = run_cli(slicer_command_line({"task": "check", "device": "cpu", "outputDirectory": out, "configFile": config}))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # Slicer marks a CLI "completed with errors" when stderr is not empty
    stdout = result.stdout
    assert stdout.index("<filter-start>") < stdout.index("<filter-progress>") < stdout.index("<filter-end>")
    assert "<filter-name>CTFMTrain</filter-name>" in stdout
    progress = filter_progress(stdout)
    assert progress == sorted(progress) and progress[0] == 0.0 and progress[-1] == 1.0
    comments = re.findall(r"<filter-comment>(.*)</filter-comment>", stdout)
    import torch

    assert any(torch.__version__ in c for c in comments)
    assert any("computes correctly" in c for c in comments)
    assert out.is_dir() and list(out.iterdir()) == []  # write test cleaned up after itself


def test_check_task_fails_clearly_for_an_absent_device(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_cli(slicer_command_line({"task": "check", "device": "cuda"}))
    assert result.returncode == 1
    assert "cuda" in result.stderr and "not available" in result.stderr
    assert "<filter-end>" in result.stdout


def test_check_task_reports_a_broken_configuration(tmp_path):
    pytest.importorskip("torch")
    config = tmp_path / "broken.json"
    config.write_text("{not json")
    result = run_cli(slicer_command_line({"task": "check", "device": "cpu", "configFile": config}))
    assert result.returncode == 1 and "does not parse" in result.stderr


@pytest.mark.slow
def test_training_tasks_refuse_bad_arguments_and_configurations(tmp_path):
    missing = run_cli(slicer_command_line({"task": "pretrain"}))
    assert missing.returncode == 1
    assert "--configFile" in missing.stderr and "--outputDirectory" in missing.stderr

    config = tmp_path / "train.json"
    config.write_text(json.dumps({"epochs": 1}))
    result = run_cli(slicer_command_line({"task": "segment", "configFile": config, "outputDirectory": tmp_path / "out"}))
    assert result.returncode == 1
    assert "unknown configuration key 'epochs'" in result.stderr and "Traceback" not in result.stderr
    assert filter_progress(result.stdout)[-1] < 1.0  # never reports completion of work it did not do

    resume = run_cli(slicer_command_line({"task": "classify", "configFile": config, "outputDirectory": tmp_path / "out", "resume": "true"}))
    assert resume.returncode == 1 and "checkpoint" in resume.stderr


def test_installed_layout_finds_ctfmlib_in_qt_scripted_modules(tmp_path):
    """In an extension build, CTFMTrain.py sits in cli-modules next to qt-scripted-modules/CTFMLib."""
    lib = tmp_path / "lib" / "Slicer-5.8"
    (lib / "cli-modules").mkdir(parents=True)
    for name in ("CTFMTrain.py", "CTFMTrain.xml"):
        (lib / "cli-modules" / name).write_bytes((CLI_DIR / name).read_bytes())
    package = lib / "qt-scripted-modules" / "CTFMLib"
    package.mkdir(parents=True)
    for name in ("__init__.py", "progress.py"):
        (package / name).write_bytes((REPO / "CTFM" / "CTFMLib" / name).read_bytes())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -S: no site-packages, so the only CTFMLib to find is the one in qt-scripted-modules.
    result = subprocess.run(
        [sys.executable, "-S", str(lib / "cli-modules" / "CTFMTrain.py"), "--task", "pretrain", "--device", "cpu", "--maxSteps", "0"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert "<filter-start>" in result.stdout, result.stderr
    assert result.returncode == 1 and "--configFile" in result.stderr


@pytest.mark.slow
def test_pretrain_task_trains_and_reports_progress_slicer_can_follow(tmp_path):
    pytest.importorskip("torch")
    config = tiny_pretraining(tmp_path)
    out = tmp_path / "run"
    result = run_cli(slicer_command_line({"task": "pretrain", "device": "cpu", "configFile": config,
                                          "outputDirectory": out}), timeout=300)
    assert result.returncode == 0, result.stderr
    progress = filter_progress(result.stdout)
    assert progress[-1] == 1.0 and progress == sorted(progress)
    assert "<filter-end>" in result.stdout
    comments = re.findall(r"<filter-comment>(.*?)</filter-comment>", result.stdout)
    assert any("step 4 of 4" in c for c in comments)
    from CTFMLib.weights import load_model

    encoder, _ = load_model(out / "model", expect="SegResEncoder")
    assert encoder.init_filters == 4
    assert (out / "metrics.csv").read_text().count("\n") == 5  # header + 4 steps

    again = run_cli(slicer_command_line({"task": "pretrain", "device": "cpu", "configFile": config,
                                         "outputDirectory": out, "resume": "true", "maxSteps": "6"}), timeout=300)
    assert again.returncode == 0, again.stderr
    assert (out / "metrics.csv").read_text().count("\n") == 7  # continued at step 5, not from scratch


@pytest.mark.slow
def test_sigterm_stops_pretraining_with_a_checkpoint_within_10_s(tmp_path):
    pytest.importorskip("torch")
    import signal
    import time

    config = tiny_pretraining(tmp_path)
    data = json.loads(config.read_text())
    data["optim"]["max_steps"] = 100000
    data["run"]["checkpoint_every"] = 100000  # only the stop writes one
    config.write_text(json.dumps(data))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *slicer_command_line(
        {"task": "pretrain", "device": "cpu", "configFile": config, "outputDirectory": out})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # wait until training is under way
            if "step 3 of" in line:
                break
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        proc.kill()
    assert elapsed < 10, elapsed
    # Not a success (issue 14, A21): 143 after SIGTERM, with an ERROR line saying how to continue.
    assert proc.returncode == 143, err
    assert "Stopped at step" in rest and "Resume" in rest
    assert "ERROR: training stopped (SIGTERM)" in err and "Resume" in err
    from CTFMLib.train.trainer import load_checkpoint

    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] >= 3
