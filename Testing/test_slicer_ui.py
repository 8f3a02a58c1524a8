"""The Slicer module's static parts: the .ui matches the Python code, CMake lists every file, icons."""
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "TextSCFRegistration"
MODULE_PY = MODULE_DIR / "TextSCFRegistration.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "TextSCFRegistration.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = ROOT / "CMakeLists.txt"

# Widget class expected from the name's suffix (longest suffix first).
SUFFIX_CLASSES = [
    ("CollapsibleButton", {"ctkCollapsibleButton"}),
    ("Selector", {"qMRMLNodeComboBox"}),
    ("ComboBox", {"QComboBox"}),
    ("TableWidget", {"QTableWidget"}),
    ("SliderWidget", {"ctkSliderWidget"}),
    ("SpinBox", {"QSpinBox", "QDoubleSpinBox"}),
    ("CheckBox", {"QCheckBox"}),
    ("ProgressBar", {"QProgressBar"}),
    ("LineEdit", {"QLineEdit", "ctkPathLineEdit"}),
    ("Button", {"QPushButton"}),
    ("Label", {"QLabel"}),
]

# What the brief asks for, by name.
REQUIRED_WIDGETS = {
    "fixedVolumeSelector": "qMRMLNodeComboBox",
    "movingVolumeSelector": "qMRMLNodeComboBox",
    "fixedSegmentationSelector": "qMRMLNodeComboBox",
    "movingSegmentationSelector": "qMRMLNodeComboBox",
    "initialTransformSelector": "qMRMLNodeComboBox",
    "outputTransformSelector": "qMRMLNodeComboBox",
    "outputVolumeSelector": "qMRMLNodeComboBox",
    "jacobianVolumeSelector": "qMRMLNodeComboBox",
    "statsTableSelector": "qMRMLNodeComboBox",
    "presetComboBox": "QComboBox",
    "regionsTableWidget": "QTableWidget",
    "templateLineEdit": "QLineEdit",
    "modelSourceComboBox": "QComboBox",
    "modelPathLineEdit": "ctkPathLineEdit",
    "modelUrlLineEdit": "QLineEdit",
    "modelSha256LineEdit": "QLineEdit",
    "initialAlignmentComboBox": "QComboBox",
    "deviceComboBox": "QComboBox",
    "integrationComboBox": "QComboBox",
    "refineIterationsSpinBox": "QSpinBox",
    "refineLearningRateSpinBox": "QDoubleSpinBox",
    "refineSmoothWeightSliderWidget": "ctkSliderWidget",
    "refineFieldIterationsSpinBox": "QSpinBox",
    "showDisplacementMagnitudeCheckBox": "QCheckBox",
    "automaticScheduleCheckBox": "QCheckBox",
    "guideWithMovingLabelsCheckBox": "QCheckBox",
    "advancedCollapsibleButton": "ctkCollapsibleButton",
    "applyButton": "QPushButton",
    "cancelButton": "QPushButton",
    "progressBar": "QProgressBar",
}

NODE_TYPES = {
    "fixedVolumeSelector": ["vtkMRMLScalarVolumeNode"],
    "movingVolumeSelector": ["vtkMRMLScalarVolumeNode"],
    "fixedSegmentationSelector": ["vtkMRMLSegmentationNode", "vtkMRMLLabelMapVolumeNode"],
    "movingSegmentationSelector": ["vtkMRMLSegmentationNode", "vtkMRMLLabelMapVolumeNode"],
    "initialTransformSelector": ["vtkMRMLTransformNode"],
    "outputTransformSelector": ["vtkMRMLTransformNode"],
    "outputVolumeSelector": ["vtkMRMLScalarVolumeNode"],
    "jacobianVolumeSelector": ["vtkMRMLScalarVolumeNode"],
    "statsTableSelector": ["vtkMRMLTableNode"],
}


@pytest.fixture(scope="module")
def ui_root():
    return ET.parse(UI_FILE).getroot()


@pytest.fixture(scope="module")
def widgets(ui_root):
    found = {}
    for element in ui_root.iter("widget"):
        name = element.get("name")
        assert name not in found, f"widget name {name!r} is used twice in the .ui"
        found[name] = element
    return found


def widget_property(element, name):
    for prop in element.findall("property"):
        if prop.get("name") == name:
            value = list(prop)[0]
            if value.tag == "stringlist":
                return [s.text for s in value.findall("string")]
            return value.text
    return None


def module_source():
    return MODULE_PY.read_text(encoding="utf-8")


def used_widget_names():
    return sorted(set(re.findall(r"\bself\.ui\.(\w+)", module_source())))


def parameter_node_fields():
    source = module_source()
    block = source[source.index("class TextSCFRegistrationParameterNode"):]
    block = block[:block.index("\n#\n")]
    return set(re.findall(r"^        (\w+): ", block, flags=re.M))


def test_ui_parses_and_is_a_mrml_widget(ui_root, widgets):
    assert ui_root.tag == "ui"
    assert ui_root.find("class").text == "TextSCFRegistration"
    top = ui_root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "TextSCFRegistration"
    assert len(widgets) > 40


def test_every_widget_the_code_uses_exists_with_the_expected_class(widgets):
    used = used_widget_names()
    assert len(used) >= 20
    for name in used:
        assert name in widgets, f"self.ui.{name} is used in TextSCFRegistration.py but missing from the .ui"
        cls = widgets[name].get("class")
        for suffix, classes in SUFFIX_CLASSES:
            if name.lower().endswith(suffix.lower()):
                assert cls in classes, f"{name} is a {cls}, expected one of {sorted(classes)}"
                break
        else:
            pytest.fail(f"widget name {name!r} has no recognised suffix")


def test_required_widgets_exist(widgets):
    for name, cls in REQUIRED_WIDGETS.items():
        assert name in widgets, f"{name} missing from the .ui"
        assert widgets[name].get("class") == cls, f"{name}: {widgets[name].get('class')} != {cls}"
    # the advanced section starts collapsed
    assert widget_property(widgets["advancedCollapsibleButton"], "collapsed") == "true"


def test_node_selectors_have_node_types_and_get_the_scene(ui_root, widgets):
    receivers = {c.find("receiver").text for c in ui_root.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"
                 and c.find("sender").text == "TextSCFRegistration"}
    selectors = {n for n, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors == set(NODE_TYPES)
    for name in selectors:
        assert widget_property(widgets[name], "nodeTypes") == NODE_TYPES[name], name
        assert name in receivers, f"{name} does not receive the scene (mrmlSceneChanged -> setMRMLScene)"
    # outputs may be created from the selector; inputs may not
    for name in ("outputTransformSelector", "outputVolumeSelector", "jacobianVolumeSelector", "statsTableSelector"):
        assert widget_property(widgets[name], "addEnabled") == "true"
    for name in ("fixedVolumeSelector", "movingVolumeSelector"):
        assert widget_property(widgets[name], "addEnabled") == "false"
        assert widget_property(widgets[name], "showChildNodeTypes") == "false"  # no labelmaps as images


def test_parameter_names_in_the_ui_are_parameter_node_fields(widgets):
    fields = parameter_node_fields()
    assert {"fixedVolume", "movingVolume", "outputTransform", "refineIterations", "preset", "regionsJson"} <= fields
    connected = {}
    for name, element in widgets.items():
        parameter = widget_property(element, "SlicerParameterName")
        if parameter is not None:
            assert parameter in fields, f"{name} is connected to unknown parameter {parameter!r}"
            assert parameter not in connected, f"{parameter} is connected twice"
            connected[parameter] = name
    # every node selector is connected to the parameter node
    for name in NODE_TYPES:
        assert widget_property(widgets[name], "SlicerParameterName") is not None, name


def parameter_node_numeric_defaults() -> dict[str, float]:
    source = module_source()
    block = source[source.index("class TextSCFRegistrationParameterNode"):]
    block = block[:block.index("\n#\n")]
    return {name: float(value) for name, value in
            re.findall(r"^        (\w+): Annotated\[(?:int|float), [^\n]*\] = ([-+0-9.e]+)$", block, flags=re.M)}


def test_numeric_widgets_start_at_the_parameter_node_defaults(widgets):
    """A spin box whose .ui value differed from its parameter's default would flicker to the other on first use."""
    defaults = parameter_node_numeric_defaults()
    from textscf.schedule import CHECKPOINT_FIELD_STEPS, CHECKPOINT_NETWORK_STEPS

    # the manual iterations start at the bundled model's default schedule
    assert (defaults["refineIterations"], defaults["refineFieldIterations"]) == (CHECKPOINT_NETWORK_STEPS,
                                                                                 CHECKPOINT_FIELD_STEPS)
    checked = 0
    for element in widgets.values():
        parameter = widget_property(element, "SlicerParameterName")
        if parameter in defaults:
            value = widget_property(element, "value")
            shown = float(value) if value is not None else 0.0  # Qt's default value is 0
            assert shown == pytest.approx(defaults[parameter]), f"{parameter}: .ui {shown} != default {defaults[parameter]}"
            checked += 1
    assert checked >= 5


def parameter_node_bool_defaults() -> dict[str, bool]:
    source = module_source()
    block = source[source.index("class TextSCFRegistrationParameterNode"):]
    block = block[:block.index("\n#\n")]
    return {name: value == "True" for name, value in
            re.findall(r"^        (\w+): bool = (True|False)$", block, flags=re.M)}


def test_check_boxes_start_at_the_parameter_node_defaults(widgets):
    """The automatic schedule is on and label guidance off, in the .ui as in the parameter node."""
    defaults = parameter_node_bool_defaults()
    assert defaults["automaticSchedule"] is True and defaults["guideWithMovingLabels"] is False
    checked = 0
    for element in widgets.values():
        parameter = widget_property(element, "SlicerParameterName")
        if element.get("class") == "QCheckBox" and parameter in defaults:
            shown = widget_property(element, "checked") == "true"  # Qt's default is unchecked
            assert shown == defaults[parameter], f"{parameter}: .ui {shown} != default {defaults[parameter]}"
            checked += 1
    assert checked >= 3


def test_custom_widgets_are_declared(ui_root, widgets):
    declared = {c.find("class").text for c in ui_root.iter("customwidget")}
    used = {w.get("class") for w in widgets.values()}
    custom = {c for c in used if c.startswith(("ctk", "qMRML"))}
    assert custom <= declared, f"undeclared custom widgets: {custom - declared}"


def test_regions_table_has_two_columns(widgets):
    columns = widgets["regionsTableWidget"].findall("column")
    assert [widget_property(c, "text") for c in columns] == ["Region name (prompt)", "Label value"]


# ------------------------------------------------------------------------------------------------------------------
# CMake


def cmake_commands(text):
    """(command, [arguments]) of a CMake file; comments dropped, quoted strings kept whole."""
    text = re.sub(r'"[^"]*"|#[^\n]*', lambda m: m.group(0) if m.group(0).startswith('"') else "", text)
    commands = []
    for match in re.finditer(r"(\w+)\s*\(((?:[^()]|\([^()]*\))*)\)", text):
        args = re.findall(r'"[^"]*"|[^\s]+', match.group(2))
        commands.append((match.group(1), [a.strip('"') for a in args]))
    return commands


def glob_recurse(pattern):
    """CMake's file(GLOB_RECURSE) for 'dir/*.ext' or 'dir/*': the '*' also crosses subfolders."""
    folder, _, name = pattern.rpartition("/")
    return {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / folder).rglob(name) if p.is_file()}


def expand_module_list(variable):
    """Files a `set(VAR ...)` of the module CMakeLists names, with globs evaluated like CMake would."""
    commands = cmake_commands(MODULE_CMAKE.read_text())
    variables = {"MODULE_NAME": None}
    globs = {}
    for command, args in commands:
        if command == "set" and args and args[0] == "MODULE_NAME":
            variables["MODULE_NAME"] = args[1]
        if command == "file" and args and args[0] == "GLOB_RECURSE":
            name = args[1]
            patterns = [a for a in args[2:] if a not in ("RELATIVE", "CONFIGURE_DEPENDS")
                        and not a.startswith("${CMAKE_CURRENT_SOURCE_DIR}")]
            globs[name] = {f for pattern in patterns for f in glob_recurse(pattern)}
    for command, args in commands:
        if command == "list" and args[:2] == ["FILTER", args[1]] and args[2:4] == ["EXCLUDE", "REGEX"]:
            regex = args[4].replace("\\\\", "\\")
            globs[args[1]] = {f for f in globs.get(args[1], set()) if not re.search(regex, f)}
    for command, args in commands:
        if command == "set" and args and args[0] == variable:
            files = set()
            for arg in args[1:]:
                glob = re.fullmatch(r"\$\{(\w+)\}", arg)
                if glob and glob.group(1) in globs:
                    files |= globs[glob.group(1)]
                else:
                    files.add(arg.replace("${MODULE_NAME}", variables["MODULE_NAME"]))
            return files
    raise AssertionError(f"{variable} is not set in {MODULE_CMAKE}")


def test_module_cmake_lists_every_script():
    listed = expand_module_list("MODULE_PYTHON_SCRIPTS")
    for path in listed:
        assert (MODULE_DIR / path).is_file(), f"CMakeLists lists {path}, which does not exist"
    existing = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py")
                if "__pycache__" not in p.parts and p.parts[len(MODULE_DIR.parts)] != "Testing"}
    assert "TextSCFRegistration.py" in existing and "textscf/__init__.py" in existing
    assert existing <= listed, f"scripts not listed in CMakeLists: {sorted(existing - listed)}"


def test_module_cmake_lists_resources_and_builds_the_module():
    resources = expand_module_list("MODULE_PYTHON_RESOURCES")
    for required in ("Resources/Icons/TextSCFRegistration.png", "Resources/UI/TextSCFRegistration.ui"):
        assert required in resources
    for path in resources:
        assert (MODULE_DIR / path).is_file(), f"CMakeLists lists {path}, which does not exist"
    data = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "textscf" / "resources").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".py", ".pyc")}
    assert data and data <= resources, f"engine data not listed: {sorted(data - resources)}"
    names = [c for c, _ in cmake_commands(MODULE_CMAKE.read_text())]
    text = MODULE_CMAKE.read_text()
    assert "slicerMacroBuildScriptedModule" in names and "WITH_GENERIC_TESTS" in text
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", text)
    assert (MODULE_DIR / "Testing" / "CMakeLists.txt").is_file()
    assert (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").is_file()


def test_top_level_cmake_has_the_extension_metadata():
    commands = cmake_commands(TOP_CMAKE.read_text())
    settings = {args[0]: args[1:] for c, args in commands if c == "set" and args}
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert settings.get(key) and settings[key][0], f"{key} missing"
    assert settings["EXTENSION_CATEGORY"] == ["Registration"]
    assert settings["EXTENSION_DEPENDS"] == ["PyTorch"]
    assert settings["EXTENSION_ICONURL"][0].endswith("TextSCF.png")
    order = [(c, args) for c, args in commands]
    calls = [c for c, _ in order]
    assert ("find_package", ["Slicer", "REQUIRED"]) in order
    assert ("include", ["${Slicer_USE_FILE}"]) in order
    assert ("add_subdirectory", ["TextSCFRegistration"]) in order
    assert order[-1] == ("include", ["${Slicer_EXTENSION_CPACK}"])
    assert calls.index("find_package") < calls.index("add_subdirectory")


# ------------------------------------------------------------------------------------------------------------------
# Icons


@pytest.mark.parametrize("path", [ROOT / "TextSCF.png", MODULE_DIR / "Resources" / "Icons" / "TextSCFRegistration.png"])
def test_icons_are_128_pixel_pngs(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)
    assert len(data) > 2000  # a drawn icon, not a blank placeholder


def test_enum_combo_boxes_list_the_enum_labels_in_order():
    """Combo boxes bound to enums show the same entries, in the same order, as the module's enums."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("TextSCFRegistration_enums", MODULE_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root = ET.parse(UI_FILE).getroot()
    for widget_name, enum_class in (("modelSourceComboBox", module.ModelSource),
                                    ("initialAlignmentComboBox", module.InitialAlignment),
                                    ("integrationComboBox", module.Integration)):
        widget = root.find(f".//widget[@name='{widget_name}']")
        assert widget is not None, widget_name
        items = [i.find("./property/string").text for i in widget.findall("./item")]
        assert items == [member.label() for member in enum_class], widget_name


# ------------------------------------------------------------------------------------------------------------------
# Extension catalog: license, screenshot, contributors, documentation


RAW_PREFIX = "https://raw.githubusercontent.com/TextSCF/SlicerTextSCF/main/"


def test_catalog_urls_point_to_files_in_the_repository():
    commands = cmake_commands(TOP_CMAKE.read_text())
    settings = {args[0]: args[1:] for c, args in commands if c == "set" and args}
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in settings[key][0].split():
            assert url.startswith(RAW_PREFIX), url
            assert (ROOT / url[len(RAW_PREFIX):]).is_file(), f"{key}: {url} names no file of the repository"
    assert "Resources/Screenshots/" in settings["EXTENSION_SCREENSHOTURLS"][0]


def test_catalog_contributors_license_and_documentation_link():
    import tomllib

    commands = cmake_commands(TOP_CMAKE.read_text())
    settings = {args[0]: args[1:] for c, args in commands if c == "set" and args}
    # The extension template's form: "Name (Organization)", several separated by commas
    for contributor in settings["EXTENSION_CONTRIBUTORS"][0].split(", "):
        assert re.fullmatch(r"[^()]+ \([^()]+\)", contributor), contributor
    module = MODULE_PY.read_text(encoding="utf-8")
    assert re.search(r"self\.parent\.contributors = \[\"[^\"()]+ \([^\"()]+\)\"\]", module)

    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["license"] == {"text": "Apache-2.0"}

    # The documentation link (extension homepage and module help) is the README's Slicer section
    homepage = settings["EXTENSION_HOMEPAGE"][0]
    assert homepage == "https://github.com/TextSCF/SlicerTextSCF#in-3d-slicer" and homepage in module
    assert "\n## In 3D Slicer\n" in (ROOT / "README.md").read_text(encoding="utf-8")
