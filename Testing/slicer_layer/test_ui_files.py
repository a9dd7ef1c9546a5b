"""The modules' .ui files against the code that uses them, and against Qt itself.

Static part (xml.etree + ast, no Qt): every ``self.ui.<name>`` the module code
uses exists in its .ui; widget classes follow the naming the code relies on;
every parameter-node field is bound (``SlicerParameterName``) to a widget that
Slicer's parameterNodeWrapper can connect to that type (the rules of
``Base/Python/slicer/parameterNodeWrapper/guiConnectors.py``, ``canRepresent``).

Qt part (PySide6, offscreen): each .ui loads with ``QUiLoader``; CTK and
qMRML classes fall back to the base class their ``<customwidgets><extends>``
declares; properties of Qt's own widgets are real Qt properties (a typo would
silently become a dynamic property); progress bars start hidden at 0, action
buttons start disabled, placeholder sections are collapsed.
"""

import ast
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = ("CTFM", "CTFMSegment", "CTFMRetrieve")

# Widget name suffix -> the classes the module code expects (first match wins).
SUFFIX_CLASSES = (
    ("CollapsibleButton", {"ctkCollapsibleButton"}),
    ("PathLineEdit", {"ctkPathLineEdit"}),
    ("SliderWidget", {"ctkSliderWidget"}),
    ("DoubleSpinBox", {"QDoubleSpinBox", "ctkDoubleSpinBox"}),
    ("Button", {"QPushButton"}),
    ("Selector", {"qMRMLNodeComboBox"}),
    ("ComboBox", {"QComboBox", "ctkComboBox"}),
    ("ProgressBar", {"QProgressBar"}),
    ("LineEdit", {"QLineEdit"}),
    ("Label", {"QLabel"}),
    ("TableView", {"qMRMLTableView"}),
    ("TableWidget", {"QTableWidget"}),
    ("TextEdit", {"QPlainTextEdit"}),
    ("SpinBox", {"QSpinBox"}),
    ("CheckBox", {"QCheckBox", "ctkCheckBox"}),
)

# What the issue asks each panel to show (section placeholders included).
REQUIRED_WIDGETS = {
    "CTFM": {
        "modelsCollapsibleButton", "modelsTableWidget", "downloadModelButton", "importModelButton",
        "removeModelButton", "cacheFolderPathLineEdit", "deviceComboBox",
        "embeddingCollapsibleButton", "inputVolumeSelector", "weightsLineEdit", "embedModeComboBox",
        "computeEmbeddingButton", "embeddingProgressBar", "embeddingStatusLabel",
        "modelsProgressBar", "modelsStatusLabel",
        "triageCollapsibleButton", "triageVolumeSelector", "triageModelComboBox", "triageModelFolderPathLineEdit",
        "triageSaliencyCheckBox", "triageSaliencyMethodComboBox", "triageButton", "triageProgressBar",
        "triageStatusLabel",
        "saliencyCollapsibleButton", "saliencyVolumeSelector", "saliencyTargetComboBox", "saliencyWeightsLineEdit",
        "saliencySegmentationModelLineEdit", "saliencyClassNameLineEdit", "saliencyTriageModelFolderPathLineEdit",
        "saliencyPointSourceComboBox", "saliencyPointListSelector", "saliencyMethodComboBox", "saliencyRegionComboBox",
        "saliencyCubeDoubleSpinBox", "saliencyRoiSelector", "saliencyButton", "saliencyProgressBar",
        "saliencyStatusLabel", "saliencyOpacitySliderWidget", "saliencyThresholdSliderWidget",
    },
    "CTFMSegment": {
        "inputVolumeSelector", "modelComboBox", "modelFolderPathLineEdit", "qualityComboBox", "spacingComboBox",
        "planSummaryLabel", "deviceComboBox", "structuresLineEdit", "outputSegmentationSelector", "show3DCheckBox",
        "segmentButton", "segmentProgressBar", "logTextEdit",
    },
    "CTFMRetrieve": {
        "indexPathLineEdit", "weightsLineEdit", "indexStatisticsLabel", "addVolumesButton", "addFolderPathLineEdit",
        "addFolderButton", "indexProgressBar", "indexStatusLabel", "inputVolumeSelector", "queryModeComboBox",
        "queryRoiSelector", "numberOfResultsSpinBox", "excludeQueryCaseCheckBox", "thumbnailsCheckBox",
        "deviceComboBox", "findSimilarButton", "retrieveProgressBar", "statusLabel", "resultsTableView",
        "thumbnailLabel", "showResultButton",
    },
}


def segment_model_choices() -> list:
    """Whole-body, the catalogue's other segmentation models (tumour tasks) in catalogue order, then folder."""
    import json

    catalogue = json.loads((REPO / "Resources" / "Models.json").read_text(encoding="utf-8"))
    tumour = [m["id"] for m in catalogue["models"] if m["task"] == "segmentation" and m["id"] != "whole_body_segmentation"]
    return ["whole-body", *tumour, "folder"]


def triage_catalogue_ids() -> list:
    """The catalogue's triage models (task "triage"), in catalogue order."""
    import json

    catalogue = json.loads((REPO / "Resources" / "Models.json").read_text(encoding="utf-8"))
    return [m["id"] for m in catalogue["models"] if m["task"] == "triage"]


# Choices the issue specifies for the parameter-node combo boxes.
REQUIRED_CHOICES = {
    ("CTFM", "device"): ["auto", "cpu", "cuda", "mps"],
    ("CTFM", "embedMode"): ["volume", "scan", "point"],
    ("CTFM", "saliencyTarget"): ["embedding", "point", "class", "triage"],
    ("CTFM", "saliencyMethod"): ["occlusion", "gradient"],
    ("CTFM", "triageSaliencyMethod"): ["occlusion", "gradient"],
    ("CTFM", "saliencyRegion"): ["whole", "cube", "roi"],
    ("CTFM", "saliencyPointSource"): ["markup", "crosshair"],
    ("CTFM", "triageModel"): ["folder", *triage_catalogue_ids()],
    ("CTFMSegment", "device"): ["auto", "cpu", "cuda", "mps"],
    ("CTFMSegment", "model"): segment_model_choices(),
    ("CTFMSegment", "quality"): ["full", "standard", "fast"],
    ("CTFMSegment", "spacing"): ["model", "native"],
    ("CTFMRetrieve", "queryMode"): ["crosshair", "roi", "scan"],
    ("CTFMRetrieve", "device"): ["auto", "cpu", "cuda", "mps"],
}
ACTION_BUTTONS = {"CTFM": "computeEmbeddingButton", "CTFMSegment": "segmentButton", "CTFMRetrieve": "findSimilarButton"}
# Parameter-node fields that are deliberately not bound to a widget.
UNBOUND_FIELDS = {("CTFMRetrieve", "resultsTable")}  # shown through qMRMLTableView.setMRMLTableNode


# --- parsing ---------------------------------------------------------------------------


@dataclass
class UiFile:
    top_name: str
    top_class: str
    widgets: dict  # name -> class
    custom: dict  # custom class -> extends
    bindings: dict  # parameter name -> widget name
    properties: dict  # widget name -> {property name: element}
    dynamic: dict = field(default_factory=dict)  # widget name -> {stdset=0 property names}
    connections: list = field(default_factory=list)  # (sender, signal, receiver, slot)


def parse_ui(path: Path) -> UiFile:
    root = ET.parse(path).getroot()
    top = root.find("widget")
    widgets, properties, dynamic, bindings = {}, {}, {}, {}
    for w in top.iter("widget"):
        name = w.get("name")
        assert name not in widgets, f"{path.name}: widget name {name} used twice"
        widgets[name] = w.get("class")
        own = [p for p in w.findall("property")]
        properties[name] = {p.get("name"): p for p in own if p.get("stdset") != "0"}
        dynamic[name] = {p.get("name") for p in own if p.get("stdset") == "0"}
        for p in own:
            if p.get("name") == "SlicerParameterName":
                parameter = p.find("string").text
                assert parameter not in bindings, f"{path.name}: parameter {parameter} bound twice"
                bindings[parameter] = name
    custom = {c.findtext("class"): c.findtext("extends") for c in root.iter("customwidget")}
    connections = [
        tuple(c.findtext(k) for k in ("sender", "signal", "receiver", "slot")) for c in root.iter("connection")
    ]
    return UiFile(top.get("name"), top.get("class"), widgets, custom, bindings, properties, dynamic, connections)


@dataclass
class Field:
    name: str
    base: str  # str, int, float, bool, Path or a vtkMRML class name
    validators: list  # (name, evaluated args) of Annotated extras, e.g. ("Choice", [["a", "b"]])
    default: object


def module_namespace(tree: ast.Module) -> dict:
    """Names the module imports from CT-FM packages, imported for real (they need no Slicer)."""
    namespace = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0].startswith("CTFM"):
            module = __import__(node.module, fromlist=[a.name for a in node.names])
            for alias in node.names:
                namespace[alias.asname or alias.name] = getattr(module, alias.name)
    return namespace


def parameter_fields(tree: ast.Module, namespace: dict) -> dict:
    decorated = [
        c for c in tree.body
        if isinstance(c, ast.ClassDef) and any(ast.unparse(d) == "parameterNodeWrapper" for d in c.decorator_list)
    ]
    assert len(decorated) == 1, "exactly one @parameterNodeWrapper class per module"
    fields = {}
    for stmt in decorated[0].body:
        if not isinstance(stmt, ast.AnnAssign):
            continue
        annotation, validators = stmt.annotation, []
        if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
            base, *extras = annotation.slice.elts
            for extra in extras:
                assert isinstance(extra, ast.Call)
                args = [eval(compile(ast.Expression(a), "<annotation>", "eval"), dict(namespace)) for a in extra.args]
                validators.append((ast.unparse(extra.func), args))
            annotation = base
        default = None if stmt.value is None else eval(compile(ast.Expression(stmt.value), "<default>", "eval"), dict(namespace))
        fields[stmt.target.id] = Field(stmt.target.id, ast.unparse(annotation), validators, default)
    return fields


def ui_names_used(tree: ast.Module) -> set:
    """X in every ``<something>.ui.X`` (self.ui in the widget, widget.ui in the tests)."""
    return {
        n.attr for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute) and n.value.attr == "ui"
    }


@dataclass
class Module:
    name: str
    ui: UiFile
    tree: ast.Module
    fields: dict


@pytest.fixture(scope="module", params=MODULES)
def module(request) -> Module:
    name = request.param
    tree = ast.parse((REPO / name / f"{name}.py").read_text(encoding="utf-8"))
    return Module(name, parse_ui(REPO / name / "Resources" / "UI" / f"{name}.ui"), tree, parameter_fields(tree, module_namespace(tree)))


# --- static checks -------------------------------------------------------------------------


def expected_classes(widget_name: str):
    for suffix, classes in SUFFIX_CLASSES:
        if widget_name.endswith(suffix):
            return classes
    return None


def test_top_widget_is_a_qmrmlwidget_named_after_the_module(module):
    assert module.ui.top_name == module.name
    assert module.ui.top_class == "qMRMLWidget"


def test_mrml_widgets_receive_the_scene(module):
    """loadUI + setMRMLScene reaches a qMRML widget only through a mrmlSceneChanged connection."""
    for name, cls in module.ui.widgets.items():
        if cls.startswith("qMRML") and name != module.ui.top_name:
            assert (module.ui.top_name, "mrmlSceneChanged(vtkMRMLScene*)", name, "setMRMLScene(vtkMRMLScene*)") in module.ui.connections, name


def test_module_code_loads_its_own_ui(module):
    # either loads "UI/<name>.ui" itself or hands "<name>.ui" to the shared mixin's loadModuleUI
    calls = [n for n in ast.walk(module.tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    loaded = {ast.literal_eval(c.args[0]) for c in calls if c.func.attr == "loadModuleUI" and c.args}
    literals = {n.value for n in ast.walk(module.tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert f"{module.name}.ui" in loaded or f"UI/{module.name}.ui" in literals
    # binds the .ui to the parameter node itself, or through the shared mixin that does
    attributes = {n.attr for n in ast.walk(module.tree) if isinstance(n, ast.Attribute)}
    names = {n.id for n in ast.walk(module.tree) if isinstance(n, ast.Name)}
    assert "connectGui" in attributes or "ParameterNodeWidgetMixin" in names


def test_every_widget_the_code_uses_exists(module):
    missing = ui_names_used(module.tree) - set(module.ui.widgets)
    assert not missing, f"{module.name}.py uses widgets its .ui lacks: {sorted(missing)}"


def test_required_widgets_exist(module):
    missing = REQUIRED_WIDGETS[module.name] - set(module.ui.widgets)
    assert not missing, f"{module.name}.ui lacks {sorted(missing)}"


def test_widget_classes_follow_their_names(module):
    for name, cls in module.ui.widgets.items():
        if name == module.ui.top_name:
            continue
        classes = expected_classes(name)
        assert classes is not None, f"{module.name}.ui: widget {name} ({cls}) has no recognised name suffix"
        assert cls in classes, f"{module.name}.ui: {name} is a {cls}, expected one of {sorted(classes)}"


def test_custom_widgets_are_declared_with_a_qt_base(module):
    from_qt = {c for c in module.ui.widgets.values() if c.startswith("Q")}
    custom_used = set(module.ui.widgets.values()) - from_qt
    assert custom_used <= set(module.ui.custom), f"undeclared custom widgets: {custom_used - set(module.ui.custom)}"
    for cls, base in module.ui.custom.items():
        assert base and base.startswith("Q"), f"{cls} must extend a Qt class, not {base!r}"


def connectable(field: Field, widget_class: str, ui: UiFile, widget_name: str) -> bool:
    """Mirror of Slicer's parameterNodeWrapper GUI connectors (canRepresent)."""
    choice = any(v[0] == "Choice" for v in field.validators)
    base = field.base
    if base.startswith("vtkMRML"):
        if widget_class != "qMRMLNodeComboBox":
            return False
        node_types = [s.text for s in ui.properties[widget_name]["nodeTypes"].iter("string")]
        return base in node_types
    if widget_class in ("QComboBox", "ctkComboBox"):
        return choice and base in ("str", "int", "float", "bool")
    allowed = {
        "bool": {"QCheckBox", "ctkCheckBox", "QPushButton", "ctkCheckablePushButton"},
        "int": {"QSpinBox", "QSlider"},
        "float": {"QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider", "ctkDoubleSpinBox", "qMRMLSpinBox"},
        "str": {"QLineEdit", "QLabel", "QTextEdit"},
        "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    }
    return widget_class in allowed.get(base, set())


def test_bindings_connect_to_parameter_fields_of_a_compatible_type(module):
    for parameter, widget_name in module.ui.bindings.items():
        assert parameter in module.fields, f"{module.name}.ui binds {widget_name} to unknown parameter {parameter}"
        field_ = module.fields[parameter]
        widget_class = module.ui.widgets[widget_name]
        assert connectable(field_, widget_class, module.ui, widget_name), (
            f"{module.name}: parameter {parameter} ({field_.base}, {field_.validators}) cannot drive a {widget_class}"
        )


def test_every_parameter_is_bound_to_a_widget(module):
    unbound = {f for f in module.fields if f not in module.ui.bindings and (module.name, f) not in UNBOUND_FIELDS}
    assert not unbound, f"{module.name}: parameters without a widget: {sorted(unbound)}"


def test_choices_are_the_specified_ones_and_contain_the_default(module):
    for parameter, field_ in module.fields.items():
        for validator, args in field_.validators:
            if validator == "Choice":
                assert field_.default in args[0], f"{module.name}.{parameter}: default {field_.default!r} not in {args[0]}"
            if validator == "WithinRange":
                assert args[0] <= field_.default <= args[1]
        if (module.name, parameter) in REQUIRED_CHOICES:
            choices = [args[0] for v, args in field_.validators if v == "Choice"]
            assert choices == [REQUIRED_CHOICES[(module.name, parameter)]]


def test_hub_defaults_to_the_published_feature_extractor():
    tree = ast.parse((REPO / "CTFM" / "CTFM.py").read_text(encoding="utf-8"))
    fields = parameter_fields(tree, module_namespace(tree))
    assert fields["weights"].default == "project-lighter/ct_fm_feature_extractor"


# --- Qt (PySide6, offscreen) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def qt_loader():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtWidgets = pytest.importorskip("PySide6.QtWidgets", reason="PySide6 is not installed")
    QtUiTools = pytest.importorskip("PySide6.QtUiTools")
    QtCore = pytest.importorskip("PySide6.QtCore")
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    messages = []
    previous = QtCore.qInstallMessageHandler(lambda mode, context, text: messages.append(text))
    yield app, QtUiTools.QUiLoader, QtWidgets, messages
    QtCore.qInstallMessageHandler(previous)


# Warnings expected when CTK/qMRML widgets fall back to their Qt base class.
EXPECTED_WARNINGS = (
    re.compile(r"unable to create a custom widget of the class '(\w+)'; defaulting to base class"),
    re.compile(r"The set-type property (\w+) could not be read"),
    re.compile(r"No such signal QWidget::mrmlSceneChanged\(vtkMRMLScene\*\)"),
    re.compile(r"QObject::connect: +\((sender|receiver) name:"),
    re.compile(r"propagateSizeHints"),
)


@pytest.fixture(scope="module")
def loaded(module, qt_loader):
    app, QUiLoader, QtWidgets, messages = qt_loader
    messages.clear()
    root = QUiLoader().load(str(REPO / module.name / "Resources" / "UI" / f"{module.name}.ui"))
    assert root is not None
    root.show()
    app.processEvents()
    yield root, QtWidgets, list(messages)
    root.close()
    root.deleteLater()


def qt_class(ui: UiFile, cls: str) -> str:
    while cls in ui.custom:
        cls = ui.custom[cls]
    return cls


def test_ui_loads_with_only_the_expected_fallback_warnings(module, loaded):
    _, _, messages = loaded
    unexpected = [m for m in messages if not any(p.search(m) for p in EXPECTED_WARNINGS)]
    assert not unexpected, unexpected
    for m in messages:
        fallback = EXPECTED_WARNINGS[0].search(m)
        if fallback:
            assert fallback.group(1) in module.ui.custom
        set_property = EXPECTED_WARNINGS[1].search(m)
        if set_property:  # only CTK enums may be unreadable to plain Qt
            owners = [n for n, props in module.ui.properties.items() if set_property.group(1) in props]
            assert owners and all(module.ui.widgets[n] in module.ui.custom for n in owners)


def test_loaded_widgets_have_the_declared_classes(module, loaded):
    root, QtWidgets, _ = loaded
    for name, cls in module.ui.widgets.items():
        widget = root if name == module.ui.top_name else root.findChild(QtWidgets.QWidget, name)
        assert widget is not None, name
        assert widget.metaObject().className() == qt_class(module.ui, cls)


def test_qt_widget_properties_are_real_properties(module, loaded):
    root, QtWidgets, _ = loaded
    for name, props in module.ui.properties.items():
        if module.ui.widgets[name] in module.ui.custom:
            continue  # CTK/qMRML properties are not on the fallback class
        widget = root.findChild(QtWidgets.QWidget, name)
        for prop in props:
            assert widget.metaObject().indexOfProperty(prop) >= 0, f"{name}.{prop} is not a Qt property of {module.ui.widgets[name]}"


def test_progress_bars_start_hidden_at_zero(module, loaded):
    root, QtWidgets, _ = loaded
    bars = [n for n, c in module.ui.widgets.items() if c == "QProgressBar"]
    assert bars
    for name in bars:
        bar = root.findChild(QtWidgets.QProgressBar, name)
        assert bar.isHidden() and not bar.isVisible() and bar.value() == 0


def test_action_button_starts_disabled_until_the_inputs_are_valid(module, loaded):
    root, QtWidgets, _ = loaded
    button = root.findChild(QtWidgets.QPushButton, ACTION_BUTTONS[module.name])
    assert button.isVisible() and not button.isEnabled() and button.text()


def test_bound_parameter_widgets_are_visible_or_collapsible(module, loaded):
    """Bound widgets show up (only point and model-folder rows hide, by mode, in code)."""
    root, QtWidgets, _ = loaded
    for widget_name in module.ui.bindings.values():
        assert not root.findChild(QtWidgets.QWidget, widget_name).isHidden(), widget_name


def test_hub_sections(qt_loader):
    """The Models buttons, Triage and Saliency sections are real (no "later version" placeholders left)."""
    _app, QUiLoader, QtWidgets, _ = qt_loader
    root = QUiLoader().load(str(REPO / "CTFM" / "Resources" / "UI" / "CTFM.ui"))
    for name in ("downloadModelButton", "importModelButton", "removeModelButton", "triageButton", "saliencyButton"):
        button = root.findChild(QtWidgets.QPushButton, name)
        assert not button.isEnabled()  # the code enables them once a model is selected / the inputs are valid
        assert button.toolTip() and "later" not in button.toolTip()
    for name in ("triageCollapsibleButton", "saliencyCollapsibleButton"):
        section = root.findChild(QtWidgets.QWidget, name)
        assert section.property("collapsed") is True  # optional sections start closed
        texts = [label.text() for label in section.findChildren(QtWidgets.QLabel)]
        assert texts and not any("later version" in t for t in texts)
    for name in ("modelsCollapsibleButton", "embeddingCollapsibleButton"):
        assert not root.findChild(QtWidgets.QWidget, name).property("collapsed")
    table = root.findChild(QtWidgets.QTableWidget, "modelsTableWidget")
    headers = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
    assert headers == ["Model", "Task", "Status", "Repository"]
    assert table.editTriggers() == QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers
    assert table.selectionMode() == QtWidgets.QAbstractItemView.SelectionMode.SingleSelection
    weights = root.findChild(QtWidgets.QLineEdit, "weightsLineEdit")
    assert weights.placeholderText() == "project-lighter/ct_fm_feature_extractor"
    assert root.findChild(QtWidgets.QLineEdit, "saliencyWeightsLineEdit").placeholderText() == weights.placeholderText()
    root.deleteLater()


def test_hub_saliency_controls_match_the_parameter_ranges(qt_loader):
    """The cube spin box starts at the parameter's default within its range; the sliders cover 0..1."""
    _app, QUiLoader, QtWidgets, _ = qt_loader
    tree = ast.parse((REPO / "CTFM" / "CTFM.py").read_text(encoding="utf-8"))
    fields = parameter_fields(tree, module_namespace(tree))
    cube = fields["saliencyCubeMm"]
    (low, high), = [args for v, args in cube.validators if v == "WithinRange"]
    root = QUiLoader().load(str(REPO / "CTFM" / "Resources" / "UI" / "CTFM.ui"))
    spin = root.findChild(QtWidgets.QDoubleSpinBox, "saliencyCubeDoubleSpinBox")
    assert (spin.minimum(), spin.maximum(), spin.value()) == (low, high, cube.default)
    assert spin.suffix().strip() == "mm"
    ui = parse_ui(REPO / "CTFM" / "Resources" / "UI" / "CTFM.ui")
    for name, parameter in (("saliencyOpacitySliderWidget", "saliencyOpacity"),
                            ("saliencyThresholdSliderWidget", "saliencyThreshold")):
        props = ui.properties[name]
        assert (float(props["minimum"].findtext("double")), float(props["maximum"].findtext("double"))) == (0.0, 1.0)
        (low, high), = [args for v, args in fields[parameter].validators if v == "WithinRange"]
        assert (low, high) == (0.0, 1.0) and 0.0 < fields[parameter].default < 1.0
    root.deleteLater()


def test_segment_log_is_read_only(qt_loader):
    _app, QUiLoader, QtWidgets, _ = qt_loader
    root = QUiLoader().load(str(REPO / "CTFMSegment" / "Resources" / "UI" / "CTFMSegment.ui"))
    log = root.findChild(QtWidgets.QPlainTextEdit, "logTextEdit")
    assert log.isReadOnly()
    log.appendPlainText("a line")  # what the widget does with messages
    assert log.toPlainText() == "a line"
    root.deleteLater()


def test_segment_panel_starts_from_the_parameter_defaults(qt_loader):
    """The widgets show the parameter node's defaults before the node is connected (no flicker, no surprise)."""
    _app, QUiLoader, QtWidgets, _ = qt_loader
    tree = ast.parse((REPO / "CTFMSegment" / "CTFMSegment.py").read_text(encoding="utf-8"))
    fields = parameter_fields(tree, module_namespace(tree))
    root = QUiLoader().load(str(REPO / "CTFMSegment" / "Resources" / "UI" / "CTFMSegment.ui"))
    assert root.findChild(QtWidgets.QCheckBox, "show3DCheckBox").isChecked() is fields["show3D"].default is True
    structures = root.findChild(QtWidgets.QLineEdit, "structuresLineEdit")
    assert structures.text() == fields["structures"].default == ""
    assert structures.placeholderText()  # says that empty means all structures
    plan = root.findChild(QtWidgets.QLabel, "planSummaryLabel")
    assert plan.text() == "" and plan.wordWrap()  # filled in once a volume and model can be planned; several lines
    # the quality default is the core's (CTFMLib.segment_plan.DEFAULT_QUALITY), and the tooltips name every choice
    from CTFMLib.segment_plan import DEFAULT_QUALITY, QUALITIES

    assert fields["quality"].default == DEFAULT_QUALITY and fields["spacing"].default == "model"
    quality_tip = root.findChild(QtWidgets.QComboBox, "qualityComboBox").toolTip()
    assert all(f"{q}:" in quality_tip or f"{q} (default):" in quality_tip for q in QUALITIES)
    spacing_tip = root.findChild(QtWidgets.QComboBox, "spacingComboBox").toolTip()
    assert "model (default):" in spacing_tip and "native:" in spacing_tip
    root.deleteLater()


def test_retrieve_results_spinbox_matches_the_parameter_range(qt_loader):
    _app, QUiLoader, QtWidgets, _ = qt_loader
    tree = ast.parse((REPO / "CTFMRetrieve" / "CTFMRetrieve.py").read_text(encoding="utf-8"))
    field_ = parameter_fields(tree, module_namespace(tree))["numberOfResults"]
    (low, high), = [args for v, args in field_.validators if v == "WithinRange"]
    root = QUiLoader().load(str(REPO / "CTFMRetrieve" / "Resources" / "UI" / "CTFMRetrieve.ui"))
    spin = root.findChild(QtWidgets.QSpinBox, "numberOfResultsSpinBox")
    assert (spin.minimum(), spin.maximum(), spin.value()) == (low, high, field_.default)
    view = root.findChild(QtWidgets.QTableView, "resultsTableView")
    assert view.editTriggers() == QtWidgets.QAbstractItemView.EditTrigger.NoEditTriggers
    root.deleteLater()
