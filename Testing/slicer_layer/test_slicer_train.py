"""The CT-FM hub module's Train section logic (CTFMSlicer.train), on slicer-core and plain Python.

The section's values become the CTFMTrain CLI's parameters (their names are read from
CTFMTrain.xml here, and a check run of the real CLI accepts them); starter configurations load with
CTFMLib's own ``load_config``; :class:`TrainRun` follows a real ``vtkMRMLCommandLineModuleNode`` of
slicer-core whose status and output the test sets the way Slicer's CLI logic does
(Base/Logic/vtkSlicerCLIModuleLogic.cxx: ``SetStatus``/``SetOutputText``/``SetErrorText`` from the
CLI thread, then ``Modified()`` in the main thread). What slicer-core cannot do: run the CLI process
itself, and set ``ProcessInformation->Progress`` (not wrapped for Python), so ``GetProgress()`` stays
0 here; CTFMTest in CTFM/Testing/Python/CTFMTest.py runs the real thing inside Slicer.
"""

import copy
import json
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from CTFMSlicer.train import (
    CHECKPOINT,
    TRAIN_TASKS,
    TRAINING_TASKS,
    TrainRun,
    TrainSetupError,
    exportedModel,
    latestMetrics,
    latestOutputLine,
    trainModule,
    trainRequest,
    writeStarterConfig,
)

REPO = Path(__file__).resolve().parents[2]
XML = REPO / "CTFMTrain" / "CTFMTrain.xml"
PUBLISHED_ENCODER = "project-lighter/ct_fm_feature_extractor"


def xml_parameters() -> dict:
    """name -> element of every parameter CTFMTrain.xml declares."""
    root = ET.parse(XML).getroot()
    return {p.findtext("name"): p for group in root.findall("parameters") for p in group
            if p.tag not in ("label", "description")}


@pytest.fixture
def config_file(tmp_path):
    """A pretrain configuration that load_config accepts (data.source: a folder)."""
    scans = tmp_path / "scans"
    scans.mkdir()
    path = tmp_path / "pretrain.json"
    path.write_text(json.dumps({"data": {"source": [str(scans)]}, "optim": {"max_steps": 5}}))
    return path


# --- parameters ------------------------------------------------------------------------------


def test_parameters_are_the_cli_parameters_with_values_of_their_xml_type(tmp_path, config_file):
    declared = xml_parameters()
    python_type = {"boolean": bool, "integer": int}
    for request in (trainRequest("check"),
                    trainRequest("pretrain", config_file, tmp_path / "out", "cpu", False, 7)):
        assert set(request.parameters) == set(declared)
        for name, value in request.parameters.items():
            element = declared[name]
            assert type(value) is python_type.get(element.tag, str), name
            if element.tag.endswith("-enumeration"):
                assert value in [e.text for e in element.findall("element")], name


def test_tasks_and_devices_are_the_xml_choices():
    declared = xml_parameters()
    assert set(TRAIN_TASKS) == {e.text for e in declared["task"].findall("element")}
    assert set(TRAINING_TASKS) == set(TRAIN_TASKS) - {"check"}
    for device in (e.text for e in declared["device"].findall("element")):
        assert trainRequest("check", device=device).parameters["device"] == device


def test_training_parameters_are_absolute_paths(tmp_path, config_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    request = trainRequest("pretrain", "pretrain.json", "out", "auto", False, 0)
    assert request.parameters == {"task": "pretrain", "configFile": str(config_file),
                                  "outputDirectory": str(tmp_path / "out"), "device": "auto", "resume": False,
                                  "maxSteps": 0}
    assert request.notes == []


def test_check_needs_neither_configuration_nor_output_folder(tmp_path):
    request = trainRequest("check", None, ".", "cpu", True, 0)  # "." is what an empty Path parameter holds
    assert request.parameters["configFile"] == "" and request.parameters["outputDirectory"] == ""
    assert request.parameters["resume"] is False  # resume means nothing to the check
    with pytest.raises(TrainSetupError, match="does not exist"):
        trainRequest("check", tmp_path / "nowhere.json")


@pytest.mark.parametrize("empty", [None, "", ".", "  "])
def test_training_tasks_need_a_configuration_file(tmp_path, empty):
    for task in TRAINING_TASKS:
        with pytest.raises(TrainSetupError,
                           match=f"Choose a configuration file for task '{task}'.*Create configuration"):
            trainRequest(task, empty, tmp_path / "out")


def test_missing_or_unusable_configuration_is_named(tmp_path, config_file):
    with pytest.raises(TrainSetupError, match=r"nowhere\.json does not exist.*Create configuration"):
        trainRequest("pretrain", tmp_path / "nowhere.json", tmp_path / "out")
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"optim": {"learning_rate": 0.1}}))
    with pytest.raises(TrainSetupError, match="cannot be used for task 'pretrain'.*optim.learning_rate"):
        trainRequest("pretrain", typo, tmp_path / "out")
    with pytest.raises(TrainSetupError, match="configuration is for task 'pretrain'"):
        written = json.loads(config_file.read_text())
        written["task"] = "pretrain"
        config_file.write_text(json.dumps(written))
        trainRequest("classify", config_file, tmp_path / "out")
    text = tmp_path / "notes.txt"
    text.write_text("{}")
    with pytest.raises(TrainSetupError, match="JSON or YAML"):
        trainRequest("pretrain", text, tmp_path / "out")


@pytest.mark.parametrize("empty", [None, "", "."])
def test_training_tasks_need_an_output_folder(config_file, empty):
    with pytest.raises(TrainSetupError, match="Choose an output folder"):
        trainRequest("pretrain", config_file, empty)


def test_an_output_folder_that_is_a_file_is_refused(tmp_path, config_file):
    with pytest.raises(TrainSetupError, match="is a file"):
        trainRequest("pretrain", config_file, config_file)


def test_a_folder_with_a_checkpoint_needs_resume(tmp_path, config_file):
    out = tmp_path / "out"
    (out / CHECKPOINT).parent.mkdir(parents=True)
    (out / CHECKPOINT).write_bytes(b"a checkpoint")
    with pytest.raises(TrainSetupError, match="already holds a training run.*tick Resume.*or choose an empty folder"):
        trainRequest("pretrain", config_file, out, resume=False)
    request = trainRequest("pretrain", config_file, out, resume=True)
    assert request.parameters["resume"] is True and request.notes == []


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path, config_file):
    request = trainRequest("pretrain", config_file, tmp_path / "new", resume=True)
    assert request.parameters["resume"] is False  # the CLI refuses --resume without a checkpoint
    assert len(request.notes) == 1 and "starts from scratch" in request.notes[0]


@pytest.mark.parametrize("steps", [-1, 10_000_001, 2.5, True, "10"])
def test_bad_maximum_steps_are_refused(tmp_path, steps):
    with pytest.raises(TrainSetupError, match="Maximum steps"):
        trainRequest("check", maxSteps=steps)


def test_unknown_task_or_device_is_refused():
    with pytest.raises(TrainSetupError, match="Unknown task 'finetune'"):
        trainRequest("finetune")
    with pytest.raises(TrainSetupError, match="Unknown device 'tpu'"):
        trainRequest("check", device="tpu")


def test_the_real_cli_accepts_the_parameters_as_slicer_passes_them(tmp_path):
    """Slicer builds the command line from the XML (test_cli_module.slicer_command_line does the same)."""
    pytest.importorskip("torch")
    from test_cli_module import run_cli, slicer_command_line

    request = trainRequest("check", None, tmp_path / "out", "cpu", False, 0)
    result = run_cli(slicer_command_line(request.parameters))
    assert result.returncode == 0, result.stderr
    assert "The training environment is ready." in result.stdout


# --- starter configuration ---------------------------------------------------------------------


def test_starter_configurations_load_for_each_task_and_hold_the_sources(tmp_path):
    from CTFMLib.train.config import DEFAULTS, load_config

    scans = tmp_path / "scans"
    scans.mkdir()
    table = tmp_path / "labels.csv"
    table.write_text("path,label\n")
    for task in TRAINING_TASKS:
        path = writeStarterConfig(task, tmp_path / f"{task}.json", [scans, table])
        assert path == tmp_path / f"{task}.json"
        config = load_config(path, task)
        assert config["data"]["source"] == [str(scans), str(table)]
        expected_weights = None if task == "pretrain" else PUBLISHED_ENCODER  # fine-tuning starts from CT-FM
        assert config["model"]["weights"] == expected_weights
        rest = copy.deepcopy(config)
        rest["data"]["source"] = DEFAULTS[task]["data"]["source"]
        rest["model"]["weights"] = DEFAULTS[task]["model"]["weights"]
        assert rest == load_config(None, task)  # everything else is the task's default
        written = json.loads(path.read_text())
        assert written["task"] == task and set(written) == set(DEFAULTS[task])  # every section, to edit
        # and the Train section accepts it as it is
        assert trainRequest(task, path, tmp_path / f"out-{task}").parameters["configFile"] == str(path)


def test_starter_configuration_with_chosen_weights_and_relative_source(tmp_path, monkeypatch):
    from CTFMLib.train.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "scans").mkdir()
    path = writeStarterConfig("pretrain", "p.json", "scans", weights="/models/encoder")
    config = load_config(path, "pretrain")
    assert config["data"]["source"] == [str(tmp_path / "scans")] and config["model"]["weights"] == "/models/encoder"


def test_starter_configuration_problems_are_explained(tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    with pytest.raises(TrainSetupError, match="training task.*not 'check'"):
        writeStarterConfig("check", tmp_path / "c.json", [scans])
    with pytest.raises(TrainSetupError, match="Choose the training data for task 'classify'.*'label' column"):
        writeStarterConfig("classify", tmp_path / "c.json", [])
    with pytest.raises(TrainSetupError, match=r"not found: .*missing\.csv"):
        writeStarterConfig("classify", tmp_path / "c.json", [tmp_path / "missing.csv"])
    with pytest.raises(TrainSetupError, match=r"name it \*\.json"):
        writeStarterConfig("pretrain", tmp_path / "c.yaml", [scans])
    with pytest.raises(TrainSetupError, match="where to save"):
        writeStarterConfig("pretrain", "", [scans])
    existing = tmp_path / "existing.json"
    existing.write_text("{}")
    with pytest.raises(TrainSetupError, match="already exists"):
        writeStarterConfig("pretrain", existing, [scans])
    assert existing.read_text() == "{}"
    writeStarterConfig("pretrain", existing, [scans], overwrite=True)
    assert json.loads(existing.read_text())["data"]["source"] == [str(scans)]


# --- after a run ----------------------------------------------------------------------------------


def test_exported_model_is_the_model_folder_with_a_config(tmp_path):
    assert exportedModel(tmp_path) is None
    (tmp_path / "model").mkdir()
    assert exportedModel(tmp_path) is None  # an empty folder is not a model
    (tmp_path / "model" / "config.json").write_text("{}")
    assert exportedModel(tmp_path) == tmp_path / "model"
    assert exportedModel("") is None


def test_latest_metrics_reads_the_newest_row_of_this_run(tmp_path):
    metrics = tmp_path / "metrics.csv"
    assert latestMetrics(tmp_path) is None
    metrics.write_text("step,loss,lr,seconds\n")
    assert latestMetrics(tmp_path) is None  # header only
    rows = "".join(f"{k},{10.0 / k!r},0.001,0.5\n" for k in range(1, 400))  # longer than the tail it reads
    metrics.write_text("step,loss,lr,seconds,val_auc\n" + rows + "400,0.0123456,0.0005,0.5,0.875\n")
    assert latestMetrics(tmp_path) == "step 400: loss 0.01235, lr 0.0005, val_auc 0.875"
    old = time.time() - 3600
    os.utime(metrics, (old, old))
    assert latestMetrics(tmp_path, since=time.time() - 60) is None  # written by an earlier run


def test_latest_output_line_skips_element_remnants_and_unfinished_lines():
    assert latestOutputLine("") is None
    assert latestOutputLine("Preparing scans\n") == "Preparing scans"
    # Slicer strips <filter-*> elements per output chunk: one split between chunks stays in parts.
    assert latestOutputLine("Preparing scans\n<filter-prog\nress>0.1</filter-progress>\n") == "Preparing scans"
    assert latestOutputLine("step 1 of 9\nstep 2 of") == "step 1 of 9"  # the last line is still being written


def test_train_module_is_missing_outside_slicer():
    with pytest.raises(TrainSetupError, match="CT-FM Train CLI module is not loaded"):
        trainModule()


# --- following a real CLI node -----------------------------------------------------------------------

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML without Qt) is not installed")


def cli_scene():
    """A scene that can hold CLI nodes (qSlicerCoreApplication registers the class with Slicer's scene)."""
    scene = slicer.vtkMRMLScene()
    scene.RegisterNodeClass(slicer.vtkMRMLCommandLineModuleNode())
    return scene


class CliLogic:
    """Does to a real vtkMRMLCommandLineModuleNode what slicer.cli.run and Slicer's CLI logic do.

    ``__call__`` is ``slicer.cli.run``'s contract: create the node in the scene unless one is given,
    set its parameters, schedule it (Apply: clear output and error text, status Scheduled). The
    other methods are the CLI thread's updates followed by the main thread's ``Modified()``.
    """

    def __init__(self, scene, schedule=True):
        self.scene, self.schedule = scene, schedule
        self.calls = []

    def __call__(self, module, node=None, parameters=None, wait_for_completion=False):
        assert wait_for_completion is False  # the Train section never blocks Slicer
        self.calls.append((module, node, dict(parameters)))
        if node is None:
            node = self.scene.AddNewNodeByClass("vtkMRMLCommandLineModuleNode")
        if self.schedule:
            node.SetOutputText("", False)
            node.SetErrorText("", False)
            node.SetStatus(node.Scheduled)
        return node

    @staticmethod
    def status(node, status):
        node.SetStatus(status, False)
        node.Modified()

    @staticmethod
    def output(node, stdout=None, stderr=None):
        if stdout is not None:
            node.SetOutputText(stdout, False)
        if stderr is not None:
            node.SetErrorText(stderr, False)
        node.Modified()


class Recorder:
    def __init__(self):
        self.progress, self.done = [], []

    def on_progress(self, fraction, message):
        self.progress.append((fraction, message))

    def on_done(self, outcome, message, details):
        self.done.append((outcome, message, details))


def start(scene, request, logic=None, node=None):
    logic = logic or CliLogic(scene)
    seen = Recorder()
    run = TrainRun("ctfmtrain-module", request, on_progress=seen.on_progress, on_done=seen.on_done, cliRun=logic,
                   node=node)
    return run, run.start(), seen, logic


def test_a_run_is_followed_to_completion_with_the_exported_model(tmp_path, config_file):
    scene = cli_scene()
    out = tmp_path / "out"
    request = trainRequest("pretrain", config_file, out, "cpu", False, 0)
    run, node, seen, logic = start(scene, request)
    assert logic.calls == [("ctfmtrain-module", None, request.parameters)]
    assert node.GetScene() is scene and run.running and node.IsContinuousOutputUpdate()
    assert seen.progress == [(None, "Waiting for Slicer to start CT-FM Train...")]

    logic.status(node, node.Running)
    assert seen.progress[-1][0] is None and seen.progress[-1][1].startswith("Running (")  # GetProgress() 0: busy
    logic.output(node, stdout="Preparing scans: 2 of 2\n")  # progress-only update: ModifiedEvent, no status change
    assert seen.progress[-1][1].startswith("Preparing scans: 2 of 2 (")
    out.mkdir()
    (out / "metrics.csv").write_text("step,loss,lr,seconds\n1,4.5,0.0001,0.2\n2,4.25,0.0002,0.2\n")
    logic.output(node, stdout="")
    assert seen.progress[-1][1].startswith("step 2: loss 4.25, lr 0.0002 (")
    logic.status(node, node.Completing)
    assert seen.progress[-1] == (1.0, "Finishing...")
    assert seen.done == []

    (out / "model").mkdir()
    (out / "model" / "config.json").write_text("{}")
    logic.status(node, node.Completed)
    assert len(seen.done) == 1
    outcome, message, details = seen.done[0]
    assert outcome == "completed" and run.outcome == "completed"
    assert str(out / "model") in message and "Weights in the Embedding section" in message
    assert details == ""
    assert not run.running and not node.IsContinuousOutputUpdate()
    reports = len(seen.progress)
    logic.output(node, stdout="later output")
    assert len(seen.progress) == reports and len(seen.done) == 1  # no longer observed
    run.cancel()
    assert node.GetStatus() == node.Completed  # cancelling a finished run does nothing


@pytest.mark.parametrize("task, hint", [("segment", "CT-FM Segment module"), ("classify", "triage model")])
def test_the_model_hint_follows_the_task(tmp_path, task, hint):
    from CTFMSlicer.train import modelHint

    text = modelHint(task, tmp_path / "model")
    assert hint in text and str(tmp_path / "model") in text


def test_a_check_run_completes_with_the_environment_ready(tmp_path):
    scene = cli_scene()
    run, node, seen, logic = start(scene, trainRequest("check", device="cpu"))
    logic.status(node, node.Running)
    logic.status(node, node.Completed)
    assert seen.done == [("completed", "The training environment is ready.", "")]


def test_a_stopped_run_says_how_to_continue(tmp_path, config_file):
    scene = cli_scene()
    out = tmp_path / "out"
    run, node, seen, logic = start(scene, trainRequest("pretrain", config_file, out))
    logic.status(node, node.Running)
    logic.status(node, node.Completed)  # exit code 0 after SIGTERM: no model exported
    assert seen.done[0][0] == "completed" and "tick Resume" in seen.done[0][1]


def test_a_failed_run_reports_the_cli_error_and_its_tail(tmp_path, config_file):
    scene = cli_scene()
    run, node, seen, logic = start(scene, trainRequest("pretrain", config_file, tmp_path / "out"))
    logic.status(node, node.Running)
    stderr = "".join(f"warning line {i}\n" for i in range(30)) + "ERROR: data.source is empty: list CT files\n"
    logic.output(node, stderr=stderr)
    assert seen.done == []  # errors while running are not the end
    logic.status(node, node.CompletedWithErrors)
    outcome, message, details = seen.done[0]
    assert outcome == "failed"
    assert message == "CT-FM Train (pretrain) failed: data.source is empty: list CT files"
    assert details.splitlines()[-1] == "ERROR: data.source is empty: list CT files"
    assert len(details.splitlines()) == 15 and "warning line 29" in details and "warning line 10" not in details


def test_a_failure_without_error_text_says_where_to_look(tmp_path):
    scene = cli_scene()
    run, node, seen, logic = start(scene, trainRequest("check"))
    logic.status(node, node.Running)
    logic.status(node, node.CompletedWithErrors)
    assert seen.done[0][0] == "failed" and "Completed with errors" in seen.done[0][1] and "Error Log" in seen.done[0][1]


def test_idle_after_scheduling_is_a_failure_with_the_logic_error(tmp_path):
    """The CLI logic sets Idle with an error text when it cannot build the command line."""
    scene = cli_scene()
    run, node, seen, logic = start(scene, trainRequest("check"))
    node.SetErrorText('No value assigned to "Output folder"', False)
    logic.status(node, node.Idle)
    assert seen.done[0][:2] == ("failed", 'CT-FM Train (check) failed: No value assigned to "Output folder"')


def test_a_run_slicer_could_not_schedule_fails_at_once(tmp_path):
    scene = cli_scene()
    run, node, seen, logic = start(scene, trainRequest("check"), logic=CliLogic(scene, schedule=False))
    assert seen.done and seen.done[0][0] == "failed" and "could not schedule" in seen.done[0][1]
    assert not run.running


def test_no_node_from_cli_run_is_an_error(tmp_path):
    run = TrainRun("module", trainRequest("check"), cliRun=lambda *args, **kwargs: None)
    with pytest.raises(TrainSetupError, match="could not start"):
        run.start()


def test_cancel_uses_the_node_and_keeps_the_checkpoint(tmp_path, config_file):
    scene = cli_scene()
    out = tmp_path / "out"
    run, node, seen, logic = start(scene, trainRequest("pretrain", config_file, out))
    logic.status(node, node.Running)
    run.cancel()  # the real vtkMRMLCommandLineModuleNode.Cancel(): Cancelling, and the process abort flag
    assert node.GetStatus() == node.Cancelling
    assert seen.progress[-1] == (None, "Cancelling...")
    (out / CHECKPOINT).parent.mkdir(parents=True)
    (out / CHECKPOINT).write_bytes(b"step 10")
    logic.status(node, node.Cancelled)  # what the CLI thread sets once it killed the process
    outcome, message, _ = seen.done[0]
    assert outcome == "cancelled" and str(out / CHECKPOINT) in message and "tick Resume" in message


def test_cancel_while_scheduled_and_without_checkpoint(tmp_path, config_file):
    scene = cli_scene()
    run, node, seen, logic = start(scene, trainRequest("pretrain", config_file, tmp_path / "out"))
    run.cancel()
    assert node.GetStatus() == node.Cancelling
    logic.status(node, node.Cancelled)
    assert seen.done[0][:2] == ("cancelled", "Cancelled.")


def test_a_second_run_reuses_the_cli_node(tmp_path):
    scene = cli_scene()
    first, node, seen, logic = start(scene, trainRequest("check"))
    logic.status(node, node.Running)
    logic.status(node, node.Completed)
    second, again, seen2, _ = start(scene, trainRequest("check", device="cpu"), logic=logic, node=node)
    assert again is node and logic.calls[-1][1] is node
    assert scene.GetNumberOfNodesByClass("vtkMRMLCommandLineModuleNode") == 1
    logic.status(node, node.Running)
    logic.status(node, node.Completed)
    assert len(seen.done) == 1 and len(seen2.done) == 1  # the first run no longer listens


# --- the Train section of CTFM.ui ---------------------------------------------------------------------


def test_train_section_widgets_are_bound_to_the_train_parameters():
    import ast

    from test_ui_files import module_namespace, parameter_fields, parse_ui

    ui = parse_ui(REPO / "CTFM" / "Resources" / "UI" / "CTFM.ui")
    tree = ast.parse((REPO / "CTFM" / "CTFM.py").read_text(encoding="utf-8"))
    fields = parameter_fields(tree, module_namespace(tree))
    expected = {
        "trainTask": "trainTaskComboBox", "trainConfigFile": "trainConfigFilePathLineEdit",
        "trainOutputFolder": "trainOutputFolderPathLineEdit", "trainDevice": "trainDeviceComboBox",
        "trainResume": "trainResumeCheckBox", "trainMaxSteps": "trainMaxStepsSpinBox",
    }
    assert {p: w for p, w in ui.bindings.items() if p.startswith("train")} == expected
    assert {f for f in fields if f.startswith("train")} == set(expected)
    assert fields["trainTask"].validators == [("Choice", [list(TRAIN_TASKS)])]
    assert fields["trainTask"].default == "check"  # as CTFMTrain.xml, the one task that needs nothing
    devices = [e.text for e in xml_parameters()["device"].findall("element")]
    assert fields["trainDevice"].validators == [("Choice", [devices])]
    assert fields["trainConfigFile"].base == "Path" and fields["trainOutputFolder"].base == "Path"
    assert fields["trainResume"].base == "bool" and fields["trainResume"].default is False
    steps = xml_parameters()["maxSteps"].find("constraints")
    limits = [int(steps.findtext("minimum")), int(steps.findtext("maximum"))]
    assert fields["trainMaxSteps"].validators == [("WithinRange", limits)]
    maximum = ui.properties["trainMaxStepsSpinBox"]["maximum"].findtext("number")
    assert int(maximum) == int(steps.findtext("maximum"))
    # the section's buttons, progress bar and status label exist under the Train section
    root = ET.parse(REPO / "CTFM" / "Resources" / "UI" / "CTFM.ui").getroot()
    section = next(w for w in root.iter("widget") if w.get("name") == "trainCollapsibleButton")
    inside = {w.get("name") for w in section.iter("widget")}
    assert {"createTrainConfigButton", "trainButton", "trainProgressBar", "trainStatusLabel",
            "openTrainOutputButton", *expected.values()} <= inside
