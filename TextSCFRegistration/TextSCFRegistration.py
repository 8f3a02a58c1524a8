"""TextSCF Registration: 3D Slicer scripted module.

Deformable CT/MRI registration with spatially covariant filters driven by text prompts (textSCF). The module is a
thin front end: every computation happens in the engine, ``textscf.pipeline.register``; this file converts MRML
nodes to SimpleITK images and back, and presents the result (grid transform, warped volume, Jacobian map, table).

Conventions (see docs/ARCHITECTURE.md): the engine works in ITK LPS millimetres; Slicer in RAS, where
``(x, y, z)_RAS = (-x, -y, z)_LPS``. Displacements follow the resampling convention (a fixed point maps to a
moving point), which in Slicer is a transform stored as *TransformFromParent*.

The file runs unchanged in three places:

- in the Slicer application (Qt, ``slicer.app``, ``slicer.ScriptedLoadableModule`` available);
- with ``slicer-core`` (MRML and logic wheels, no Qt): only the logic and the self-test are usable, the GUI classes
  are replaced by small stand-ins so that ``TextSCFRegistrationLogic`` can be imported and used headless;
- in ctest through ``slicer_add_python_unittest``.
"""

import enum
import json
import logging
import os
import time
import unittest

import numpy as np
import vtk
from vtk.util import numpy_support as vtk_np

import slicer
from slicer.util import VTKObservationMixin

# ---------------------------------------------------------------------------------------------------------------------
# GUI guard. ``slicer.ScriptedLoadableModule`` imports ``qt`` and ``ctk`` at import time, so it only imports inside the
# Slicer application. With slicer-core (no Qt) the import fails and minimal stand-ins take over: enough for the logic
# and the self-test, while the widget refuses to start.
# ---------------------------------------------------------------------------------------------------------------------
try:
    import ctk  # noqa: F401
    import qt
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
except ImportError:
    ctk = None
    qt = None

    class ScriptedLoadableModule:
        """Stand-in used without the Slicer application: keeps the module description only."""

        def __init__(self, parent):
            self.parent = parent
            self.moduleName = self.__class__.__name__

    class ScriptedLoadableModuleWidget:
        """Stand-in used without the Slicer application: the module GUI needs Qt."""

        def __init__(self, parent=None):
            raise RuntimeError("The TextSCF Registration module GUI needs the 3D Slicer application (Qt); "
                               "use TextSCFRegistrationLogic for scripting without it.")

    class ScriptedLoadableModuleLogic:
        """Stand-in used without the Slicer application."""

        def __init__(self, parent=None):
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Logic"):
                self.moduleName = self.moduleName[: -len("Logic")]

    class ScriptedLoadableModuleTest(unittest.TestCase):
        """Stand-in used without the Slicer application: messages go to the log."""

        def delayDisplay(self, message, requestedDelay=None, msec=None):
            logging.info(message)

SLICER_APP_AVAILABLE = qt is not None and hasattr(slicer, "app")

try:
    from slicer.i18n import tr as _
except ImportError:  # slicer-core has no translation layer

    def _(text):
        return text


try:
    from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
except ImportError:  # slicer-core: no parameter node wrapper (it needs Qt for the GUI connectors)
    parameterNodeWrapper = None


#
# Constants
#

# RAS <-> LPS: flip the first two axes (the matrix is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
LPS_TO_RAS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])

# Jacobian display: a 256-entry table stretched over the window [JACOBIAN_DISPLAY_MIN, JACOBIAN_DISPLAY_MAX]. Entry i
# is centred on |J| = i * JACOBIAN_BIN (bin width 2/255), so entry 0 holds |J| <= 0 (folding, bright green; values
# below the window clamp to it, and it also takes 0 < |J| < 1/255), |J| = 1 falls between entries 127 and 128 (both
# white, the window's centre), values below 1 fade to blue and values above 1 to red, saturating at 2.
JACOBIAN_TABLE_SIZE = 256
JACOBIAN_BIN = 2.0 / 255.0
JACOBIAN_DISPLAY_MIN = -0.5 * JACOBIAN_BIN
JACOBIAN_DISPLAY_MAX = 2.0 + 0.5 * JACOBIAN_BIN
JACOBIAN_FOLDING_COLOR = (0.0, 1.0, 0.0)
JACOBIAN_LOW_COLOR = (0.23, 0.30, 0.75)   # |J| -> 0: compression
JACOBIAN_HIGH_COLOR = (0.71, 0.02, 0.15)  # |J| -> 2: expansion
JACOBIAN_COLOR_NODE_NAME = "TextSCF Jacobian"

# Stats table columns
TABLE_COLUMNS = (("Measure", "string"), ("Region", "string"), ("Value", "double"), ("Before", "double"),
                 ("Note", "string"))

# The engine's requirements: one list, shipped with the engine (textscf/resources/requirements.json).
REQUIREMENTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "textscf", "resources",
                                 "requirements.json")


def _engineRequirements():
    with open(REQUIREMENTS_FILE, encoding="utf-8") as f:
        return json.load(f)["requirements"]


# Import name -> pip requirement of what the module installs (or finds shipped with Slicer); torch comes from the
# PyTorch extension, under TORCH_REQUIREMENT.
ENGINE_REQUIREMENTS = {r["import"]: r["requirement"] for r in _engineRequirements() if r["source"] != "pytorch-extension"}
TORCH_REQUIREMENT = next(r["requirement"][len("torch"):] for r in _engineRequirements() if r["import"] == "torch")
# MONAI and numpy 2 (Slicer >= 5.10): MONAI 1.4 requires numpy < 2, and MONAI 1.5 and later require torch >= 2.4.1
# (their package metadata). With numpy 2 and an older torch, MONAI cannot be installed without breaking Slicer.
TORCH_FOR_NUMPY2 = "2.4.1"

# The refinement schedules (the bundled model's, a fresh network's), their grids and expected times live in the
# engine, in one place shared with `textscf register` and `textscf demo`: textscf.schedule (no torch needed).

# Checkpoint configurations already read: (path, mtime, size) -> config dict.
_MODEL_CONFIGS = {}

EXAMPLE_PAIR_SAMPLE_NAME = "TextSCFExamplePair"
SEGMENT_COLORS = (
    (0.90, 0.35, 0.30), (0.30, 0.65, 0.90), (0.95, 0.80, 0.25), (0.45, 0.80, 0.40), (0.75, 0.45, 0.85),
    (0.95, 0.55, 0.20), (0.35, 0.85, 0.80), (0.85, 0.40, 0.60), (0.60, 0.60, 0.30), (0.40, 0.45, 0.85),
    (0.85, 0.70, 0.55), (0.55, 0.85, 0.60), (0.70, 0.30, 0.30),
)


class InitialAlignment(enum.Enum):
    """Initial alignment before the network (the first member is the parameter node default)."""

    CENTER = "center"
    NONE = "none"
    AFFINE = "affine"

    def label(self):
        return {"center": _("Align centres"), "none": _("None"), "affine": _("Affine (intensity based)")}[self.value]


class Integration(enum.Enum):
    """Diffeomorphic integration (scaling and squaring) of the predicted field."""

    MODEL_DEFAULT = "default"
    ON = "on"
    OFF = "off"

    def label(self):
        return {"default": _("As the model was trained"), "on": _("On (diffeomorphic)"),
                "off": _("Off (displacement)")}[self.value]

    def option(self):
        """Value of ``RegistrationOptions.integrate``."""
        return {"default": None, "on": True, "off": False}[self.value]


class ModelSource(enum.Enum):
    """Where the network weights come from."""

    BUNDLED = "bundled"
    LOCAL_FILE = "file"
    URL = "url"
    FRESH = "fresh"

    def label(self):
        return {"bundled": _("Bundled default model"), "file": _("Local checkpoint file"),
                "url": _("Download from URL"),
                "fresh": _("No pretrained model (fresh network; needs Refine on this pair)")}[self.value]


#
# TextSCFRegistration
#


class TextSCFRegistration(ScriptedLoadableModule):
    """Module description. Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("TextSCF Registration")
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["TextSCF contributors (TextSCF project)"]
        self.parent.helpText = _("""
Deformable registration of CT and MRI volumes with spatially covariant filters driven by text prompts
(textSCF, Zhang et al., arXiv:2311.15607). Anatomical regions are named in plain text (a preset, or your own list);
the network adapts its filters to each region.
<p>Pick the fixed and moving volumes, a region preset, and press <b>Apply</b>. The result is a grid transform
(moving volume placed under it), a Jacobian determinant map (blue: compression, white: volume preserved,
red: expansion, green: folding) and a table of regularity and overlap measures.
Give a fixed segmentation to use your own regions; otherwise they are segmented automatically (SwinUNETR).
Give a moving segmentation to measure Dice and HD95 before and after registration.</p>
<p>Try it: <i>Sample Data</i> module, <i>TextSCF</i> category, <i>TextSCFExamplePair</i>, then Apply.</p>
<p>See more information in the <a href="https://github.com/TextSCF/SlicerTextSCF#in-3d-slicer">module
documentation</a>.</p>
""")
        self.parent.acknowledgementText = _("""
Based on textSCF, Zhang et al., "Spatially covariant image registration with text prompts" (arXiv:2311.15607).
Uses PyTorch (installed through the SlicerPyTorch extension), MONAI and open_clip.
""")
        if SLICER_APP_AVAILABLE:
            # Register the generated example pair once the application (and the SampleData module) is up.
            slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data
#


def registerSampleData():
    """Add the generated example pair to the Sample Data module.

    The pair is generated by ``textscf.phantom.make_example_pair`` rather than downloaded, so the source uses
    SampleData's ``customDownloader`` hook: the Sample Data button calls it instead of downloading the URI.
    Scripts load the pair with ``TextSCFRegistrationLogic().loadExamplePair()``.
    """
    import SampleData

    iconPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons", "TextSCFRegistration.png")
    logic = SampleData.SampleDataLogic
    if hasattr(logic, "registerCustomSampleDataCategory"):  # Slicer >= 5.10
        logic.registerCustomSampleDataCategory("TextSCF", title=_("TextSCF"))
    logic.registerCustomSampleDataSource(
        category="TextSCF",
        sampleName=EXAMPLE_PAIR_SAMPLE_NAME,
        thumbnailFileName=iconPath,
        # Not downloaded: customDownloader generates the pair. SampleData requires a URI and a file name anyway.
        uris="textscf-phantom://example-pair",
        fileNames="TextSCFExamplePair",
        nodeNames=EXAMPLE_PAIR_SAMPLE_NAME,
        customDownloader=_loadExamplePairFromSampleData,
    )


def _loadExamplePairFromSampleData(source=None):
    """SampleData customDownloader: generate the example pair and preselect it in the module's parameter node."""
    try:
        logic = TextSCFRegistrationLogic()
        nodes = logic.loadExamplePair()
        logic.selectExamplePairInParameterNode(nodes)
        if SLICER_APP_AVAILABLE:
            slicer.util.setSliceViewerLayers(background=nodes["fixedVolumeNode"], foreground=nodes["movingVolumeNode"],
                                             foregroundOpacity=0.5, fit=True)
        return nodes
    except Exception as exc:
        logging.exception("TextSCF: could not generate the example pair")
        if SLICER_APP_AVAILABLE:
            slicer.util.errorDisplay(_("Could not generate the TextSCF example pair: {0}").format(exc))
        raise


#
# TextSCFRegistrationParameterNode (only inside the Slicer application)
#

if parameterNodeWrapper is not None:
    from typing import Annotated, Union

    from slicer import (
        vtkMRMLLabelMapVolumeNode,
        vtkMRMLScalarVolumeNode,
        vtkMRMLSegmentationNode,
        vtkMRMLTableNode,
        vtkMRMLTransformNode,
    )

    @parameterNodeWrapper
    class TextSCFRegistrationParameterNode:
        """Everything the GUI lets the user choose; saved with the scene.

        ``preset``, ``regionsJson``, ``device``, ``modelPath`` and ``segmentorWeights`` are kept in sync by the widget
        itself (they have no one-to-one widget connector); the rest is connected through the ``SlicerParameterName``
        property in the .ui.
        """

        fixedVolume: vtkMRMLScalarVolumeNode
        movingVolume: vtkMRMLScalarVolumeNode
        fixedSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]
        movingSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]
        initialTransform: vtkMRMLTransformNode
        initialAlignment: InitialAlignment = InitialAlignment.CENTER
        outputTransform: vtkMRMLTransformNode
        outputVolume: vtkMRMLScalarVolumeNode
        jacobianVolume: vtkMRMLScalarVolumeNode
        statsTable: vtkMRMLTableNode
        showDisplacementMagnitude: bool = False
        modelSource: ModelSource = ModelSource.BUNDLED
        modelUrl: str = ""
        modelSha256: str = ""
        promptTemplate: str = ""
        integration: Integration = Integration.MODEL_DEFAULT
        # Automatic: the engine's default schedule (textscf.schedule), as `textscf register` and `textscf demo` run
        # it; the iterations below are used only when it is off (their defaults are the bundled model's schedule).
        automaticSchedule: bool = True
        refineIterations: Annotated[int, WithinRange(0, 10000)] = 12
        refineLearningRate: Annotated[float, WithinRange(0.0, 1.0)] = 1e-3
        refineSmoothWeight: Annotated[float, WithinRange(0.0, 100.0)] = 0.1
        refineFieldIterations: Annotated[int, WithinRange(0, 10000)] = 30
        seed: Annotated[int, WithinRange(0, 2147483647)] = 0
        # The moving segmentation scores the result; only this puts it into the refinement loss.
        guideWithMovingLabels: bool = False
        preset: str = "abdomen-ct"
        regionsJson: str = ""
        device: str = "auto"
        modelPath: str = ""
        segmentorWeights: str = ""


#
# TextSCFRegistrationWidget
#


class TextSCFRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Module GUI: thin, every computation is in TextSCFRegistrationLogic. Uses ScriptedLoadableModuleWidget base
    class, available at: https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    CUSTOM_PRESET = "custom"

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._cancelRequested = False
        self._progress = ("", 0.0, None)
        self._updatingGui = False

    # -- setup / teardown ---------------------------------------------------------------------------------------------

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TextSCFRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = TextSCFRegistrationLogic()
        self.logic.pipelineRunner = self._runInWorkerThread

        table = self.ui.regionsTableWidget
        table.setColumnCount(2)
        table.setHorizontalHeaderLabels([_("Region name (prompt)"), _("Label value")])
        table.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)
        table.horizontalHeader().setSectionResizeMode(1, qt.QHeaderView.ResizeToContents)

        self._populatePresetComboBox()
        self._populateDeviceComboBox(detectGpu=False)
        self.ui.progressBar.setValue(0)
        self.ui.cancelButton.enabled = False
        self.ui.statusLabel.text = ""

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.presetComboBox.connect("currentIndexChanged(int)", self.onPresetChanged)
        self.ui.addRegionButton.connect("clicked(bool)", self.onAddRegion)
        self.ui.removeRegionButton.connect("clicked(bool)", self.onRemoveRegion)
        self.ui.regionsFromSegmentationButton.connect("clicked(bool)", self.onRegionsFromSegmentation)
        self.ui.regionsTableWidget.connect("itemChanged(QTableWidgetItem*)", self.onRegionsTableEdited)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.segmentorWeightsPathLineEdit.connect("currentPathChanged(QString)", self.onSegmentorWeightsChanged)
        self.ui.modelSourceComboBox.connect("currentIndexChanged(int)", self._updateModelSourceWidgets)

        self.initializeParameterNode()
        # Detecting a GPU imports torch (slow): do it once the GUI is shown, and only if torch is already installed.
        qt.QTimer.singleShot(0, lambda: self._populateDeviceComboBox(detectGpu=True))

    def cleanup(self):
        self._cancelRequested = True
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        self._cancelRequested = True
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node -----------------------------------------------------------------------------------------------

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume and firstVolume.GetClassName() == "vtkMRMLScalarVolumeNode":
                self._parameterNode.fixedVolume = firstVolume
        if not self._parameterNode.regionsJson and self._parameterNode.preset != self.CUSTOM_PRESET:
            self._applyPreset(self._parameterNode.preset)

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGui:
            return
        self._updatingGui = True
        try:
            p = self._parameterNode
            self._selectComboBoxData(self.ui.presetComboBox, p.preset)
            self._setRegionsTable(self._regionsFromParameterNode())
            if not self._selectComboBoxData(self.ui.deviceComboBox, p.device):
                self._selectComboBoxData(self.ui.deviceComboBox, "auto")
            if self.ui.modelPathLineEdit.currentPath != p.modelPath:
                self.ui.modelPathLineEdit.currentPath = p.modelPath
            if self.ui.segmentorWeightsPathLineEdit.currentPath != p.segmentorWeights:
                self.ui.segmentorWeightsPathLineEdit.currentPath = p.segmentorWeights
            self._updateModelSourceWidgets()
            for widget in (self.ui.refineIterationsSpinBox, self.ui.refineFieldIterationsSpinBox):
                widget.enabled = not p.automaticSchedule
        finally:
            self._updatingGui = False
        self._checkCanApply()
        self._updateModelPlan()

    def _updateModelPlan(self):
        """Say under the model choice what Apply will run (and switch to) with these regions, before Apply."""
        import sys

        p = self._parameterNode
        if p is None or self._running:
            return
        if p.modelSource == ModelSource.URL:
            self.ui.modelPlanLabel.text = _("The downloaded model is checked against the regions on Apply.")
            return
        try:
            plan = self.logic.modelPlan(self._optionsFromGui(downloadCheckpoint=False), p.fixedVolume,
                                        torchAvailable="torch" in sys.modules)  # never import torch here: slow
            self.ui.modelPlanLabel.text = plan["message"]
        except Exception as exc:
            self.ui.modelPlanLabel.text = str(exc)

    def _checkCanApply(self):
        p = self._parameterNode
        enabled, toolTip = TextSCFRegistrationLogic.applyState(p.fixedVolume if p else None,
                                                               p.movingVolume if p else None, self._running)
        self.ui.applyButton.enabled = enabled
        self.ui.applyButton.toolTip = toolTip

    # -- presets and regions ------------------------------------------------------------------------------------------

    @staticmethod
    def _selectComboBoxData(comboBox, data):
        index = comboBox.findData(data)
        if index < 0:
            return False
        wasBlocked = comboBox.blockSignals(True)
        comboBox.setCurrentIndex(index)
        comboBox.blockSignals(wasBlocked)
        return True

    def _populatePresetComboBox(self):
        comboBox = self.ui.presetComboBox
        wasBlocked = comboBox.blockSignals(True)
        comboBox.clear()
        try:
            from textscf.presets import list_presets, load_preset

            for name in list_presets():
                preset = load_preset(name)
                comboBox.addItem(preset.title, name)
        except Exception:
            logging.exception("TextSCF: could not read the region presets")
        comboBox.addItem(_("Custom (edit the table)"), self.CUSTOM_PRESET)
        comboBox.blockSignals(wasBlocked)

    def _applyPreset(self, name):
        from textscf.presets import load_preset

        preset = load_preset(name)
        self.ui.templateLineEdit.placeholderText = preset.template
        with slicer.util.NodeModify(self._parameterNode):
            self._parameterNode.preset = name
            self._parameterNode.regionsJson = json.dumps(
                [[n, int(v)] for n, v in zip(preset.region_names, preset.label_values)])

    def onPresetChanged(self, index):
        if self._updatingGui or self._parameterNode is None:
            return
        name = self.ui.presetComboBox.itemData(index)
        if name == self.CUSTOM_PRESET:
            self._parameterNode.preset = self.CUSTOM_PRESET
            return
        with slicer.util.tryWithErrorDisplay(_("Could not load the region preset."), waitCursor=True):
            self._applyPreset(name)

    def _regionsFromParameterNode(self):
        try:
            return [(str(n), int(v)) for n, v in json.loads(self._parameterNode.regionsJson or "[]")]
        except (ValueError, TypeError):
            return []

    def _setRegionsTable(self, regions):
        table = self.ui.regionsTableWidget
        if self._readRegionsTable(strict=False) == regions:
            return
        wasBlocked = table.blockSignals(True)
        table.setRowCount(len(regions))
        for row, (name, value) in enumerate(regions):
            table.setItem(row, 0, qt.QTableWidgetItem(name))
            table.setItem(row, 1, qt.QTableWidgetItem(str(value)))
        table.blockSignals(wasBlocked)

    def _readRegionsTable(self, strict=True):
        """(name, label value) rows of the table; with ``strict``, a ValueError names the first bad row."""
        table = self.ui.regionsTableWidget
        regions = []
        for row in range(table.rowCount):
            nameItem, valueItem = table.item(row, 0), table.item(row, 1)
            name = nameItem.text().strip() if nameItem else ""
            valueText = valueItem.text().strip() if valueItem else ""
            try:
                value = int(valueText)
            except ValueError:
                if strict:
                    raise ValueError(_("Row {0} of the region table: label value '{1}' is not an integer.")
                                     .format(row + 1, valueText))
                continue
            regions.append((name, value))
        return regions

    def _markCustom(self):
        """The table no longer equals a preset: switch to custom, keeping the preset's prompt template."""
        p = self._parameterNode
        if p.preset == self.CUSTOM_PRESET:
            return
        try:
            from textscf.presets import load_preset

            template = load_preset(p.preset).template
        except Exception:
            template = ""
        if not p.promptTemplate and template:
            p.promptTemplate = template
        p.preset = self.CUSTOM_PRESET

    def onRegionsTableEdited(self, item=None):
        if self._updatingGui or self._parameterNode is None:
            return
        regions = self._readRegionsTable(strict=False)
        with slicer.util.NodeModify(self._parameterNode):
            self._markCustom()
            self._parameterNode.regionsJson = json.dumps([[n, v] for n, v in regions])

    def onAddRegion(self):
        table = self.ui.regionsTableWidget
        values = [v for _n, v in self._readRegionsTable(strict=False)]
        row = table.rowCount
        wasBlocked = table.blockSignals(True)
        table.insertRow(row)
        table.setItem(row, 0, qt.QTableWidgetItem(_("new region")))
        table.setItem(row, 1, qt.QTableWidgetItem(str(max(values, default=0) + 1)))
        table.blockSignals(wasBlocked)
        self.onRegionsTableEdited()
        table.setCurrentCell(row, 0)
        table.editItem(table.item(row, 0))

    def onRemoveRegion(self):
        table = self.ui.regionsTableWidget
        rows = sorted({index.row() for index in table.selectionModel().selectedIndexes()}, reverse=True)
        if not rows and table.currentRow() >= 0:
            rows = [table.currentRow()]
        wasBlocked = table.blockSignals(True)
        for row in rows:
            table.removeRow(row)
        table.blockSignals(wasBlocked)
        self.onRegionsTableEdited()

    def onRegionsFromSegmentation(self):
        p = self._parameterNode
        node = p.fixedSegmentation or p.movingSegmentation
        if node is None:
            slicer.util.errorDisplay(_("Select a fixed or moving segmentation first: its segments become the regions."))
            return
        with slicer.util.tryWithErrorDisplay(_("Could not read the regions of the segmentation."), waitCursor=True):
            names, values = self.logic.regionsOfNode(node)
            with slicer.util.NodeModify(p):
                self._markCustom()
                p.regionsJson = json.dumps([[n, int(v)] for n, v in zip(names, values)])

    # -- model and device ---------------------------------------------------------------------------------------------

    def _populateDeviceComboBox(self, detectGpu):
        comboBox = self.ui.deviceComboBox
        wasBlocked = comboBox.blockSignals(True)
        comboBox.clear()
        for label, value in TextSCFRegistrationLogic.deviceChoices(detectGpu):
            comboBox.addItem(label, value)
        comboBox.blockSignals(wasBlocked)
        if self._parameterNode is not None and not self._selectComboBoxData(comboBox, self._parameterNode.device):
            self._selectComboBoxData(comboBox, "auto")

    def onDeviceChanged(self, index):
        if not self._updatingGui and self._parameterNode is not None:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index) or "auto"

    def onModelPathChanged(self, path):
        if not self._updatingGui and self._parameterNode is not None:
            self._parameterNode.modelPath = path

    def onSegmentorWeightsChanged(self, path):
        if not self._updatingGui and self._parameterNode is not None:
            self._parameterNode.segmentorWeights = path

    def _segmentorWeightsForApply(self):
        """Weights for the automatic segmentation when no fixed segmentation is given: the user's, else MONAI's
        BTCV bundle from the cache, downloaded once (worker thread) after the user agrees. "": no segmentor (a fixed
        segmentation is given, or the user chose to register without regions)."""
        p = self._parameterNode
        if p.fixedSegmentation is not None:
            return ""
        if p.segmentorWeights:
            return p.segmentorWeights
        bundle = self.logic.cachedSegmentorBundle()
        if bundle:
            return bundle
        if not slicer.util.confirmYesNoDisplay(
                _("No fixed segmentation is selected. TextSCF can segment both volumes automatically with MONAI's "
                  "SwinUNETR BTCV model (13 abdominal organs): download it now (about 250 MB, once)?\n\nNo: register "
                  "without regions (the network's shared filter alone, i.e. a plain LKU-Net), as for any pair. Or "
                  "select a fixed segmentation, or point 'Segmentor weights' to weights on this computer."),
                windowTitle=_("TextSCF automatic segmentation")):
            return ""
        self._onProgress(_("Downloading the segmentation model"), 0.0)
        return self._runInWorkerThread(self.logic.downloadSegmentorBundle)

    def _updateModelSourceWidgets(self, index=None):
        if self._parameterNode is None:
            return
        source = self._parameterNode.modelSource
        for widget in (self.ui.modelPathLabel, self.ui.modelPathLineEdit):
            widget.visible = source == ModelSource.LOCAL_FILE
        for widget in (self.ui.modelUrlLabel, self.ui.modelUrlLineEdit, self.ui.modelSha256Label,
                       self.ui.modelSha256LineEdit):
            widget.visible = source == ModelSource.URL

    def _checkpointFromGui(self, download=True):
        """The ``checkpoint`` option; a URL is downloaded (worker thread, progress bar, Cancel) unless not ``download``."""
        p = self._parameterNode
        if p.modelSource == ModelSource.LOCAL_FILE:
            if not p.modelPath or not os.path.isfile(p.modelPath):
                raise ValueError(_("Model checkpoint file not found: '{0}'. Choose an existing file or use the "
                                   "bundled model.").format(p.modelPath))
            return p.modelPath
        if p.modelSource == ModelSource.URL:
            if not download:
                return None
            url, sha256 = p.modelUrl.strip(), p.modelSha256.strip()
            return self._runInWorkerThread(lambda: self.logic.downloadCheckpoint(
                url, sha256, progressCallback=lambda fraction: self._onProgress(
                    _("Downloading the model checkpoint"), fraction),
                cancelCallback=self._isCancelRequested))
        if p.modelSource == ModelSource.FRESH:
            if not p.automaticSchedule and int(p.refineIterations) <= 0:
                raise ValueError(_("A fresh network must be optimised on the pair: set 'Refine on this pair' "
                                   "iterations above 0 (e.g. 150) in the Advanced section."))
            return "fresh"
        return None

    def _optionsFromGui(self, downloadCheckpoint=True):
        """Keyword arguments of ``RegistrationOptions`` for the current GUI state."""
        p = self._parameterNode
        options = {
            "init": p.initialAlignment.value,
            "device": p.device or "auto",
            "integrate": p.integration.option(),
            "refine_learning_rate": float(p.refineLearningRate),
            "refine_smooth_weight": float(p.refineSmoothWeight),
            "refine_use_moving_labels": bool(p.guideWithMovingLabels),
            "seed": int(p.seed),
            "template": p.promptTemplate.strip() or None,
            "checkpoint": self._checkpointFromGui(download=downloadCheckpoint),
        }
        options.update(TextSCFRegistrationLogic.refineSteps(
            p.automaticSchedule, p.refineIterations, p.refineFieldIterations, options["checkpoint"]))
        if p.preset == self.CUSTOM_PRESET:
            regions = self._readRegionsTable(strict=True)
            names, values = TextSCFRegistrationLogic.validateRegions(regions)
            options["region_names"] = names
            options["label_values"] = values
        else:
            options["preset"] = p.preset
        return options

    # -- running ------------------------------------------------------------------------------------------------------

    def _setRunning(self, running):
        self._running = running
        if running:
            self._cancelRequested = False
            self._progress = (_("Starting"), 0.0, None)
            self.ui.progressBar.setValue(0)
        for section in (self.ui.inputsCollapsibleButton, self.ui.regionsCollapsibleButton,
                        self.ui.modelCollapsibleButton, self.ui.outputsCollapsibleButton,
                        self.ui.advancedCollapsibleButton):
            section.enabled = not running
        self.ui.cancelButton.enabled = running
        self._checkCanApply()

    def _onProgress(self, stage, fraction, secondsLeft=None):
        """Progress callback: may run on the worker thread, so it only stores the values; the GUI thread shows them.

        The registration's numbers are those the command line's bar shows: stage, fraction of the whole run (it moves
        with every refinement step), seconds left (an estimate, None when unknown)."""
        self._progress = (stage, fraction, secondsLeft)
        import threading

        if threading.current_thread() is threading.main_thread():
            self._refreshProgress()
            slicer.app.processEvents()

    def _refreshProgress(self):
        stage, fraction, secondsLeft = self._progress
        self.ui.progressBar.setValue(int(round(100 * max(0.0, min(1.0, fraction)))))
        self.ui.statusLabel.text = TextSCFRegistrationLogic.progressText(stage, secondsLeft)

    def _isCancelRequested(self):
        return self._cancelRequested

    def onCancelButton(self):
        self._cancelRequested = True
        self.ui.cancelButton.enabled = False
        self.ui.statusLabel.text = _("Cancelling after the current step...")

    def _runInWorkerThread(self, call):
        """Run ``call`` (the engine, which touches no MRML node) on a worker thread and keep the GUI alive.

        Only the GUI thread touches Qt and MRML: the progress callback stores values, this loop shows them. Output
        written by the worker to stdout/stderr (tqdm, print) is buffered and replayed here, because Slicer's Python
        console is a Qt widget.
        """
        import sys
        import threading

        box = {}

        def target():
            try:
                box["result"] = call()
            except BaseException as exc:  # re-raised on the GUI thread
                box["error"] = exc

        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _ThreadSafeStream(stdout), _ThreadSafeStream(stderr)
        worker = threading.Thread(target=target, name="TextSCF registration", daemon=True)
        try:
            worker.start()
            while worker.is_alive():
                worker.join(0.05)
                sys.stdout.flushPending()
                sys.stderr.flushPending()
                self._refreshProgress()
                slicer.app.processEvents()
        finally:
            sys.stdout.flushPending()
            sys.stderr.flushPending()
            sys.stdout, sys.stderr = stdout, stderr
        if "error" in box:
            raise box["error"]
        return box["result"]

    def onApplyButton(self):
        if self._running:
            return
        import traceback

        from textscf.errors import CancelledError

        try:
            # Apply and the inputs stay disabled from here on: dependency install, download and registration.
            self._setRunning(True)
            self.ui.statusLabel.text = _("Checking the Python packages...")
            if not self.logic.ensureDependencies(askConfirmation=True):
                self.ui.statusLabel.text = _("Not started: the required Python packages are not installed.")
                return
            # PyTorch may have just been installed: offer the GPU it sees.
            self._populateDeviceComboBox(detectGpu=True)
            p = self._parameterNode
            options = self._optionsFromGui()
            weights = self._segmentorWeightsForApply()
            if weights:
                options["segmentor_weights"] = weights
            plan = self.logic.modelPlan(options, p.fixedVolume, torchAvailable=True)
            self.ui.modelPlanLabel.text = plan["message"]
            if plan["switched"]:
                if not slicer.util.confirmOkCancelDisplay(plan["message"], windowTitle=_("TextSCF model")):
                    self.ui.statusLabel.text = _("Not started: choose regions the model knows, or another model.")
                    return
                options = plan["options"]
            nodes = self.logic.process(
                p.fixedVolume, p.movingVolume, options,
                fixedSegmentationNode=p.fixedSegmentation, movingSegmentationNode=p.movingSegmentation,
                initialTransformNode=p.initialTransform, outputTransformNode=p.outputTransform,
                outputVolumeNode=p.outputVolume, jacobianVolumeNode=p.jacobianVolume, statsTableNode=p.statsTable,
                showDisplacementMagnitude=p.showDisplacementMagnitude,
                progressCallback=self._onProgress, cancelCallback=self._isCancelRequested)
            with slicer.util.NodeModify(p):
                p.outputTransform = nodes["outputTransformNode"]
                p.jacobianVolume = nodes["jacobianVolumeNode"]
                p.statsTable = nodes["statsTableNode"]
                # Automatic segmentations become the inputs: inspect, correct, Apply again.
                if nodes.get("fixedSegmentationNode") is not None:
                    p.fixedSegmentation = nodes["fixedSegmentationNode"]
                if nodes.get("movingSegmentationNode") is not None:
                    p.movingSegmentation = nodes["movingSegmentationNode"]
            self.ui.progressBar.setValue(100)
            self.ui.statusLabel.text = self.logic.summary()
        except CancelledError:
            self.ui.statusLabel.text = _("Cancelled: the scene was left as it was.")
        except Exception as exc:
            logging.error(traceback.format_exc())
            self.ui.statusLabel.text = _("Failed: {0}").format(exc)
            slicer.util.errorDisplay(_("TextSCF registration failed:\n\n{0}").format(exc),
                                     detailedText=traceback.format_exc())
        finally:
            if self._running:
                self._setRunning(False)


class _ThreadSafeStream:
    """Wraps a stream: the main thread writes through, other threads' text is queued until ``flushPending``."""

    def __init__(self, stream):
        import queue
        import threading

        self._stream = stream
        self._pending = queue.SimpleQueue()
        self._mainThread = threading.main_thread()

    def write(self, text):
        import threading

        if threading.current_thread() is self._mainThread:
            return self._stream.write(text)
        self._pending.put(text)
        return len(text)

    def flush(self):
        import threading

        if threading.current_thread() is self._mainThread:
            self._stream.flush()

    def flushPending(self):
        import queue

        while True:
            try:
                text = self._pending.get_nowait()
            except queue.Empty:
                return
            self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


#
# TextSCFRegistrationLogic
#


class TextSCFRegistrationLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, usable from scripts and without the GUI (also with slicer-core alone).

    Typical use, as SlicerElastix's ``registerVolumes``::

        logic = TextSCFRegistrationLogic()
        nodes = logic.process(fixedVolumeNode, movingVolumeNode, {"preset": "abdomen-ct", "device": "cpu"})
        nodes["outputTransformNode"]  # grid transform, moving volume placed under it
    """

    FIXED_VOLUME_REFERENCE_ROLE = "fixedVolume"
    MOVING_VOLUME_REFERENCE_ROLE = "movingVolume"

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self.cancelRequested = False
        self.lastResult = None
        self.lastNodes = None
        # What the last process() decided for the user (a labelmap remapped by name, ...): shown in the table.
        self.notes = []
        # Runs the engine call (a zero-argument callable); the widget replaces it with a worker-thread runner.
        self.pipelineRunner = None

    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        return getattr(slicer, "mrmlScene", None)

    def getParameterNode(self):
        return TextSCFRegistrationParameterNode(super().getParameterNode())

    @staticmethod
    def applyState(fixedVolumeNode, movingVolumeNode, busy):
        """(enabled, tool tip) of the Apply button: off while anything runs (package install, download,
        registration), and until two different volumes are chosen."""
        if busy:
            return False, _("Running: wait for it to finish, or press Cancel.")
        if fixedVolumeNode is None or movingVolumeNode is None:
            return False, _("Select the fixed and moving volumes.")
        if fixedVolumeNode == movingVolumeNode:
            return False, _("The fixed and moving volumes must differ.")
        return True, _("Register the moving volume to the fixed volume.")

    @staticmethod
    def deviceChoices(detectGpu):
        """(label, value) of the devices to offer; the GPU only when asked to detect it and an installed torch sees
        one (the widget asks again once PyTorch has been installed)."""
        choices = [(_("Automatic"), "auto"), (_("CPU"), "cpu")]
        if detectGpu and TextSCFRegistrationLogic.cudaAvailable():
            choices.append((_("GPU (CUDA)"), "cuda"))
        return choices

    # -- dependencies -------------------------------------------------------------------------------------------------

    @staticmethod
    def missingRequirements():
        """pip requirements of the engine's packages that are not importable."""
        import importlib.util

        return [req for module, req in ENGINE_REQUIREMENTS.items() if importlib.util.find_spec(module) is None]

    @staticmethod
    def cudaAvailable():
        """True when an installed torch sees a CUDA device. Never installs anything."""
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return False
        try:
            import torch

            return bool(torch.cuda.is_available())
        except Exception:
            return False

    @staticmethod
    def installedPackageConstraints():
        """pip constraints ``name==version`` pinning every package installed in this Python (numpy, SimpleITK, vtk,
        torch, ... whatever Slicer and its extensions installed), so that pip only adds packages and never upgrades
        or downgrades one Slicer relies on."""
        import importlib.metadata
        import re

        pins = {}
        for distribution in importlib.metadata.distributions():
            name, version = distribution.metadata["Name"], distribution.version
            if name and version:
                pins.setdefault(re.sub(r"[-_.]+", "-", name).lower(), version)
        return [f"{name}=={version}" for name, version in sorted(pins.items())]

    @staticmethod
    def pipInstallArguments(requirements, constraintsPath):
        """Arguments of ``slicer.util.pip_install``: the requirements under the constraints file."""
        return list(requirements) + ["--constraint", constraintsPath]

    @staticmethod
    def torchProblem(torchVersion, numpyVersion):
        """What is wrong with the installed PyTorch for the engine (and what to do), or None when it fits."""
        def release(version):
            parts = []
            for part in str(version).split("+")[0].split("."):
                digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
                if not digits:
                    break
                parts.append(int(digits))
            return tuple(parts)

        minimum = TORCH_REQUIREMENT.lstrip(">=")
        fix = _("Fix: open the PyTorch Utils module, uninstall PyTorch and install version {0} or later, restart "
                "Slicer and press Apply again.")
        if release(torchVersion) < release(minimum):
            return _("TextSCF needs PyTorch {0} or later; this Slicer has PyTorch {1}. ").format(minimum, torchVersion) \
                + fix.format(minimum)
        if numpyVersion and release(numpyVersion) >= (2,) and release(torchVersion) < release(TORCH_FOR_NUMPY2):
            return _("PyTorch {0} is too old for the MONAI that works with this Slicer's numpy {1}: MONAI 1.4 needs "
                     "numpy < 2 (installing it would replace Slicer's numpy and break Slicer) and MONAI 1.5 or later "
                     "needs PyTorch {2} or later. ").format(torchVersion, numpyVersion, TORCH_FOR_NUMPY2) \
                + fix.format(TORCH_FOR_NUMPY2) \
                + _(" Where no such PyTorch exists (Intel Macs stop at 2.2), use a Slicer release that ships "
                    "numpy 1 (5.8).")
        return None

    def ensureDependencies(self, askConfirmation=True):
        """Install what the engine needs, after the user agrees; False when the user declined.

        PyTorch comes from the SlicerPyTorch extension (``PyTorchUtils``), which picks the build that fits the
        hardware; the other packages are installed with ``slicer.util.pip_install`` under a constraint that keeps the
        installed torch. Called on Apply, never when the module is loaded.
        """
        import importlib
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("TextSCF needs PyTorch. Install the 'PyTorch' extension from the Extensions "
                                     "Manager, restart Slicer, and press Apply again."))
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation,
                                                                  torchVersionRequirement=TORCH_REQUIREMENT)
            if torch is None:
                return False
        import importlib.metadata

        def installedVersion(name):
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                return None

        problem = self.torchProblem(installedVersion("torch") or "0", installedVersion("numpy"))
        if problem:
            raise RuntimeError(problem)
        missing = self.missingRequirements()
        if missing:
            if askConfirmation and SLICER_APP_AVAILABLE and not slicer.util.confirmOkCancelDisplay(
                    _("TextSCF needs these Python packages, which will now be downloaded and installed:\n\n{0}\n\n"
                      "This may take a few minutes. Packages already installed (numpy, SimpleITK, PyTorch, ...) are "
                      "kept as they are.").format("\n".join(missing))):
                return False
            import tempfile

            handle, constraints = tempfile.mkstemp(prefix="textscf-constraints-", suffix=".txt")
            with os.fdopen(handle, "w") as f:
                f.write("\n".join(self.installedPackageConstraints()) + "\n")
            try:
                slicer.util.pip_install(self.pipInstallArguments(missing, constraints))
            except Exception as exc:
                raise RuntimeError(_("Could not install {0} without changing a package this Slicer already has "
                                     "(every installed package is kept at its version): {1}. Fix: update Slicer or "
                                     "the PyTorch extension, or install a compatible version of the package from the "
                                     "Python console (slicer.util.pip_install).").format(", ".join(missing), exc)) \
                    from exc
            finally:
                os.remove(constraints)
            importlib.invalidate_caches()
        return True

    # -- checkpoints --------------------------------------------------------------------------------------------------

    @staticmethod
    def defaultCacheFolder():
        if SLICER_APP_AVAILABLE:
            return os.path.join(slicer.app.cachePath, "TextSCF")
        return os.path.join(os.path.expanduser("~"), ".cache", "textscf")

    @staticmethod
    def downloadCheckpoint(url, sha256, folder=None, progressCallback=None, cancelCallback=None):
        """Download a checkpoint (once) and verify its SHA-256; returns the local path.

        A file already in the cache with the right hash is reused; a mismatch raises CheckpointError and
        leaves nothing behind. Touches no Qt or MRML object, so the widget runs it on a worker thread.

        :param progressCallback: ``f(fraction)`` after each block (fraction in [0, 1]; 0 while the size is unknown).
        :param cancelCallback: ``f() -> bool``, polled after each block; True stops the download (CancelledError)
            and removes the partial file.
        """
        import hashlib
        import urllib.parse
        import urllib.request

        from textscf.errors import CancelledError, CheckpointError

        digest = (sha256 or "").strip().lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise CheckpointError("the SHA-256 of the checkpoint must be 64 hexadecimal digits; copy it from the "
                                  "model's release page")
        if not url:
            raise CheckpointError("no checkpoint URL given")
        folder = folder or os.path.join(TextSCFRegistrationLogic.defaultCacheFolder(), "checkpoints")
        os.makedirs(folder, exist_ok=True)
        baseName = os.path.basename(urllib.parse.urlparse(url).path) or "checkpoint.pt"
        path = os.path.join(folder, f"{digest[:16]}-{baseName}")

        def fileDigest(p):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            return h.hexdigest()

        if os.path.isfile(path) and fileDigest(path) == digest:
            return path
        partial = path + ".part"
        h = hashlib.sha256()
        try:
            with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0)
                done = 0
                for block in iter(lambda: response.read(1 << 20), b""):
                    h.update(block)
                    out.write(block)
                    done += len(block)
                    if progressCallback is not None:
                        progressCallback(min(1.0, done / total) if total else 0.0)
                    if cancelCallback is not None and cancelCallback():
                        raise CancelledError("checkpoint download cancelled; nothing was kept")
        except (OSError, CancelledError) as exc:
            if os.path.exists(partial):
                os.remove(partial)
            if isinstance(exc, CancelledError):
                raise
            raise CheckpointError(f"could not download the checkpoint from {url}: {exc}") from exc
        if h.hexdigest() != digest:
            os.remove(partial)
            raise CheckpointError(f"the checkpoint downloaded from {url} has SHA-256 {h.hexdigest()}, expected "
                                  f"{digest}: the file is corrupted or not the one expected")
        os.replace(partial, path)
        return path

    @staticmethod
    def segmentorBundleFolder():
        """Where MONAI's BTCV SwinUNETR bundle is kept (the module's cache folder, ``models``)."""
        from textscf.segmentation import BTCV_BUNDLE_NAME

        return os.path.join(TextSCFRegistrationLogic.defaultCacheFolder(), "models", BTCV_BUNDLE_NAME)

    @staticmethod
    def cachedSegmentorBundle():
        """The BTCV bundle folder when it was downloaded before (it has models/model.pt), else ""."""
        folder = TextSCFRegistrationLogic.segmentorBundleFolder()
        return folder if os.path.isfile(os.path.join(folder, "models", "model.pt")) else ""

    @staticmethod
    def downloadSegmentorBundle():
        """Download MONAI's BTCV SwinUNETR bundle into the cache (needs internet); returns its folder. Touches no Qt
        or MRML object: the widget runs it on its worker thread."""
        from textscf.segmentation import download_btcv_bundle

        return str(download_btcv_bundle(os.path.dirname(TextSCFRegistrationLogic.segmentorBundleFolder())))

    # -- regions ------------------------------------------------------------------------------------------------------

    @staticmethod
    def validateRegions(regions):
        """Check (name, label value) rows; returns (names, values). ValueError names the problem."""
        names, values = [], []
        for name, value in regions:
            name = str(name).strip()
            if not name:
                raise ValueError(_("A region has an empty name: every region needs a text prompt."))
            if int(value) <= 0:
                raise ValueError(_("Region '{0}': the label value must be a positive integer (0 is the background).")
                                 .format(name))
            if _normalizedName(name) in {_normalizedName(n) for n in names}:
                raise ValueError(_("Region '{0}' is listed twice.").format(name))
            if int(value) in values:
                raise ValueError(_("Label value {0} is used by two regions.").format(int(value)))
            names.append(name)
            values.append(int(value))
        if not names:
            raise ValueError(_("The region table is empty: add at least one region or choose a preset."))
        return names, values

    def regionsOfNode(self, node):
        """Region names and label values a segmentation or labelmap node carries by itself.

        Segmentation: segment names, values 1..N in segment order. Labelmap: the values present, named from the
        node's colour table when it has names there, otherwise "label <value>". Names other tools give a preset's
        regions become that region's name (TotalSegmentator's "kidney_right" -> "right kidney").
        """
        if node.IsA("vtkMRMLSegmentationNode"):
            segmentation = node.GetSegmentation()
            names = [_canonicalName(segmentation.GetNthSegment(i).GetName())
                     for i in range(segmentation.GetNumberOfSegments())]
            return names, list(range(1, len(names) + 1))
        values = [int(v) for v in np.unique(_arrayFromVolume(node)) if v != 0]
        colorNames = self.colorNamesOfLabelmap(node, values)
        return [_canonicalName(colorNames[v]) if v in colorNames else f"label {v}" for v in values], values

    @staticmethod
    def colorNamesOfLabelmap(node, values):
        """{value: name} from the labelmap's colour table, for the given values that have a real name there."""
        colorNode = node.GetDisplayNode().GetColorNode() if node.GetDisplayNode() else None
        names = {}
        for value in values:
            if colorNode is None or not 0 <= value < colorNode.GetNumberOfColors():
                continue
            name = colorNode.GetColorName(value) or ""
            if name.strip() and name.strip().lower() not in ("(none)", "background", "invalid"):
                names[value] = name
        return names

    def labelImageFromNode(self, node, referenceVolumeNode, regionNames=None, labelValues=None):
        """A segmentation or labelmap node as a label map (SimpleITK, int32) on the reference volume's grid.

        Returns ``(image, regionNames, labelValues)``. With ``regionNames``, segments are matched to regions by name
        (case, spaces, '_' and '-' ignored) and drawn with the region's label value (``labelValues``, default
        1..N); unmatched segments are left out. Without, the node's own regions are used (``regionsOfNode``).
        Labelmap values are kept as they are, unless they are another tool's (names in the labelmap's colour table, or
        values that fit another bundled labelling scheme such as TotalSegmentator's): then they are mapped onto the
        regions by name. The labelmap is resampled (nearest neighbour) if its grid differs.
        """
        from textscf.errors import InputError

        if regionNames is not None:
            regionNames = list(regionNames)
            labelValues = list(labelValues) if labelValues is not None else list(range(1, len(regionNames) + 1))
            if len(labelValues) != len(regionNames):
                raise InputError(f"{len(regionNames)} region names but {len(labelValues)} label values")
        if node.IsA("vtkMRMLSegmentationNode"):
            segmentation = node.GetSegmentation()
            segmentIds = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
            if not segmentIds:
                raise InputError(f"segmentation '{node.GetName()}' has no segments")
            segmentNames = [segmentation.GetSegment(s).GetName() for s in segmentIds]
            if regionNames is None:
                regionNames, labelValues = segmentNames, list(range(1, len(segmentIds) + 1))
                valueOfSegment = dict(zip(segmentIds, labelValues))
            else:
                valueByName = {_normalizedName(n): v for n, v in zip(regionNames, labelValues)}
                valueOfSegment = {s: valueByName[_normalizedName(n)] for s, n in zip(segmentIds, segmentNames)
                                  if _normalizedName(n) in valueByName}
                unmatched = [n for n in segmentNames if _normalizedName(n) not in valueByName]
                if not valueOfSegment:
                    raise InputError(f"none of the segments of '{node.GetName()}' ({', '.join(segmentNames)}) "
                                     f"matches a region ({', '.join(regionNames)}): rename the segments or edit the "
                                     "region table")
                if unmatched:
                    logging.warning("TextSCF: segments of '%s' without a matching region are ignored: %s",
                                    node.GetName(), ", ".join(unmatched))
            array = self._segmentsToLabelArray(node, [(s, valueOfSegment[s]) for s in segmentIds
                                                      if s in valueOfSegment], referenceVolumeNode)
            return _imageFromArray(array, referenceVolumeNode), list(regionNames), list(labelValues)

        if not node.IsA("vtkMRMLLabelMapVolumeNode") and not node.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError(f"'{node.GetName()}' is neither a segmentation nor a labelmap volume")
        import SimpleITK as sitk

        image = self.volumeNodeToSitk(node, checkFinite=False)
        reference = self.volumeNodeToSitk(referenceVolumeNode, checkFinite=False, withVoxels=False)
        if not _sameGrid(image, reference):
            image = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0,
                                  image.GetPixelID())
        image = sitk.Cast(image, sitk.sitkInt32)
        if regionNames is None:
            regionNames, labelValues = self.regionsOfNode(node)
        else:
            image = self._relabelByColorNames(node, image, regionNames, labelValues)
            image = self._relabelByDetectedScheme(node, image, regionNames, labelValues)
        return image, list(regionNames), list(labelValues)

    def _relabelByDetectedScheme(self, node, image, regionNames, labelValues):
        """Map a labelmap whose values follow another bundled labelling scheme onto the regions by name.

        A TotalSegmentator labelmap without names, read with the BTCV preset, would make its liver (5) the
        "esophagus": the engine's check (``textscf.segmentation.label_scheme_check``) finds the scheme the values
        fit instead, each of that scheme's regions gets the chosen region's value and the rest is background. The
        change is noted in the results (``notes``). When no bundled scheme fits, the values are kept and the engine
        refuses them with its message.
        """
        import SimpleITK as sitk

        from textscf.presets import same_region
        from textscf.segmentation import label_scheme_check, label_volumes_ml

        problems, candidates = label_scheme_check(label_volumes_ml(image), labelValues, regionNames)
        if not problems or not candidates:
            return image
        scheme = candidates[0]
        mapping = {int(schemeValue): int(value) for name, value in zip(regionNames, labelValues)
                   for schemeName, schemeValue in zip(scheme.region_names, scheme.label_values)
                   if same_region(name, schemeName)}
        if not mapping:
            return image
        array = sitk.GetArrayViewFromImage(image)
        lookup = np.zeros(max(int(array.max()), max(mapping)) + 1, np.int32)
        for source, target in mapping.items():
            lookup[source] = target
        relabelled = sitk.GetImageFromArray(lookup[np.clip(array, 0, None)])
        relabelled.CopyInformation(image)
        note = (f"labelmap '{node.GetName()}' has the label values of the '{scheme.name}' preset ({scheme.title}), "
                f"not those of the chosen regions ({'; '.join(problems)}); its regions were mapped by name")
        logging.warning("TextSCF: %s", note)
        self.notes.append(note)
        return relabelled

    def _relabelByColorNames(self, node, image, regionNames, labelValues):
        """Map a labelmap's values onto the regions' label values by the names in its colour table.

        A labelmap written by another tool (TotalSegmentator: 5 = liver) carries its own values; when its colour table
        names at least two of the regions, each value named as a region gets that region's value and every other
        value becomes background. Without such names the values are kept (the engine then checks that they fit).
        """
        import SimpleITK as sitk

        array = sitk.GetArrayViewFromImage(image)
        present = [int(v) for v in np.unique(array) if v != 0]
        valueOfRegion = {_normalizedName(n): int(v) for n, v in zip(regionNames, labelValues)}
        mapping = {value: valueOfRegion[_normalizedName(name)]
                   for value, name in self.colorNamesOfLabelmap(node, present).items()
                   if _normalizedName(name) in valueOfRegion}
        if len(mapping) < 2 or all(source == target for source, target in mapping.items()):
            return image
        lookup = np.zeros(max(present) + 1, np.int32)
        for source, target in mapping.items():
            lookup[source] = target
        dropped = sorted(set(present) - set(mapping))
        if dropped:
            logging.info("TextSCF: labelmap '%s' relabelled by its colour names; %d label value(s) without a region "
                         "are background", node.GetName(), len(dropped))
        relabelled = sitk.GetImageFromArray(lookup[np.clip(array, 0, None)])
        relabelled.CopyInformation(image)
        return relabelled

    @staticmethod
    def _segmentsToLabelArray(segmentationNode, segmentsAndValues, referenceVolumeNode):
        """Label array ``[k, j, i]`` on the reference grid; later segments overwrite earlier ones where they overlap."""
        dims = referenceVolumeNode.GetImageData().GetDimensions()
        reference = slicer.vtkOrientedImageData()
        ijkToRas = vtk.vtkMatrix4x4()
        referenceVolumeNode.GetIJKToRASMatrix(ijkToRas)
        reference.SetImageToWorldMatrix(ijkToRas)
        reference.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
        labels = np.zeros((dims[2], dims[1], dims[0]), np.int32)
        segmentation = segmentationNode.GetSegmentation()
        for segmentId, value in segmentsAndValues:
            layer = slicer.vtkOrientedImageData()
            slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
                segmentationNode, segmentId, layer)
            if layer.GetPointData().GetScalars() is None or layer.IsEmpty():
                continue
            resampled = slicer.vtkOrientedImageData()
            slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                layer, reference, resampled, False, False)
            extent = resampled.GetExtent()
            if extent[1] < extent[0] or resampled.GetPointData().GetScalars() is None:
                continue
            sub = vtk_np.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(
                extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
            # Shared labelmap layers hold several segments, each under its own label value.
            mask = sub == segmentation.GetSegment(segmentId).GetLabelValue()
            target = labels[extent[4]:extent[5] + 1, extent[2]:extent[3] + 1, extent[0]:extent[1] + 1]
            target[mask] = value
        return labels

    # -- MRML <-> SimpleITK -------------------------------------------------------------------------------------------

    @staticmethod
    def volumeNodeGeometryLPS(volumeNode):
        """(origin, spacing, direction 3x3) of a volume node in ITK's LPS convention."""
        directions = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASDirectionMatrix(directions)
        directionRAS = np.array([[directions.GetElement(r, c) for c in range(3)] for r in range(3)])
        originLPS = LPS_TO_RAS @ np.array(volumeNode.GetOrigin(), float)
        return originLPS, np.array(volumeNode.GetSpacing(), float), LPS_TO_RAS @ directionRAS

    @staticmethod
    def setVolumeNodeGeometryLPS(volumeNode, origin, spacing, direction):
        directionRAS = LPS_TO_RAS @ np.asarray(direction, float).reshape(3, 3)
        matrix = vtk.vtkMatrix4x4()
        for r in range(3):
            for c in range(3):
                matrix.SetElement(r, c, directionRAS[r, c])
        volumeNode.SetIJKToRASDirectionMatrix(matrix)
        volumeNode.SetOrigin(*(LPS_TO_RAS @ np.asarray(origin, float)))
        volumeNode.SetSpacing(*[float(s) for s in spacing])

    @staticmethod
    def volumeNodeToSitk(volumeNode, checkFinite=True, withVoxels=True):
        """A scalar or labelmap volume node as a SimpleITK image (LPS geometry). InputError for unusable volumes.

        The parent transform of the node, if any, is not applied (as when saving the volume to a file).
        """
        import SimpleITK as sitk

        from textscf.errors import InputError

        if volumeNode is None:
            raise InputError("no volume given")
        name = volumeNode.GetName()
        imageData = volumeNode.GetImageData()
        if imageData is None or imageData.GetPointData().GetScalars() is None:
            raise InputError(f"volume '{name}' has no voxels: load or compute it first")
        dims = imageData.GetDimensions()
        if min(dims) < 1 or imageData.GetNumberOfPoints() == 0:
            raise InputError(f"volume '{name}' is empty (dimensions {dims})")
        if imageData.GetNumberOfScalarComponents() != 1:
            raise InputError(f"volume '{name}' has {imageData.GetNumberOfScalarComponents()} components per voxel; "
                             "convert it to a scalar volume (e.g. Vector to Scalar Volume module)")
        if withVoxels:
            array = np.array(_arrayFromVolume(volumeNode), copy=True)
            if checkFinite and np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).any():
                raise InputError(f"volume '{name}' contains no finite value (all NaN or infinite)")
            if array.dtype == np.int64:
                array = array.astype(np.int32)
            image = sitk.GetImageFromArray(array)
        else:
            image = sitk.Image([int(d) for d in dims], sitk.sitkUInt8)
        origin, spacing, direction = TextSCFRegistrationLogic.volumeNodeGeometryLPS(volumeNode)
        image.SetOrigin([float(v) for v in origin])
        image.SetSpacing([float(v) for v in spacing])
        image.SetDirection([float(v) for v in direction.ravel()])
        return image

    @staticmethod
    def updateVolumeNodeFromSitk(volumeNode, image):
        """Fill a scalar or labelmap volume node with a scalar SimpleITK image (voxels and geometry)."""
        import SimpleITK as sitk

        if image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError("only scalar images can fill a scalar volume node")
        array = sitk.GetArrayFromImage(image)
        if array.dtype == np.int64:
            array = array.astype(np.int32)
        elif array.dtype == np.uint64:
            array = array.astype(np.uint32)
        _updateVolumeFromArray(volumeNode, array)
        TextSCFRegistrationLogic.setVolumeNodeGeometryLPS(
            volumeNode, image.GetOrigin(), image.GetSpacing(), np.array(image.GetDirection()).reshape(3, 3))

    @staticmethod
    def gridPointsRAS(volumeNode):
        """RAS coordinates of every voxel centre, shape ``(K, J, I, 3)``."""
        dims = volumeNode.GetImageData().GetDimensions()
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        matrix = _arrayFromVTKMatrix(ijkToRas)
        k, j, i = np.meshgrid(np.arange(dims[2]), np.arange(dims[1]), np.arange(dims[0]), indexing="ij")
        ijk = np.stack([i, j, k], axis=-1).astype(float)
        return ijk @ matrix[:3, :3].T + matrix[:3, 3]

    @staticmethod
    def transformNodeToSitk(transformNode, referenceVolumeNode):
        """A transform node as the engine's initial transform (resampling convention, LPS).

        The node is read as Slicer users set it: placing the moving volume under it aligns it to the fixed volume.
        Its *from world* transform therefore maps fixed points to moving points. Linear transforms become an
        ``AffineTransform``; others are sampled on the reference (fixed) grid into a displacement field.
        """
        import SimpleITK as sitk

        if transformNode.IsTransformToWorldLinear():
            matrix = vtk.vtkMatrix4x4()
            transformNode.GetMatrixTransformFromWorld(matrix)
            lps = LPS_TO_RAS_4 @ _arrayFromVTKMatrix(matrix) @ LPS_TO_RAS_4
            affine = sitk.AffineTransform(3)
            affine.SetMatrix([float(v) for v in lps[:3, :3].ravel()])
            affine.SetTranslation([float(v) for v in lps[:3, 3]])
            return affine
        fromWorld = vtk.vtkGeneralTransform()
        transformNode.GetTransformFromWorld(fromWorld)
        pointsRAS = TextSCFRegistrationLogic.gridPointsRAS(referenceVolumeNode)
        shape = pointsRAS.shape
        source = vtk.vtkPoints()
        source.SetData(vtk_np.numpy_to_vtk(pointsRAS.reshape(-1, 3), deep=True, array_type=vtk.VTK_DOUBLE))
        target = vtk.vtkPoints()
        target.SetDataTypeToDouble()
        fromWorld.TransformPoints(source, target)
        mappedRAS = vtk_np.vtk_to_numpy(target.GetData()).reshape(shape)
        displacementLPS = (mappedRAS - pointsRAS) @ LPS_TO_RAS.T
        field = sitk.GetImageFromArray(displacementLPS.astype(np.float64), isVector=True)
        reference = TextSCFRegistrationLogic.volumeNodeToSitk(referenceVolumeNode, checkFinite=False,
                                                              withVoxels=False)
        field.CopyInformation(reference)
        return sitk.DisplacementFieldTransform(field)

    @staticmethod
    def setGridTransformFromDisplacement(transformNode, displacement):
        """Store an LPS displacement field (SimpleITK vector image, resampling convention) in a transform node.

        The node gets a ``vtkOrientedGridTransform`` as *TransformFromParent* whose grid has the field's geometry in
        RAS and whose vectors are the displacements in RAS millimetres.
        """
        import SimpleITK as sitk

        if displacement.GetNumberOfComponentsPerPixel() != 3 or displacement.GetDimension() != 3:
            raise ValueError("the displacement must be a 3D image of 3-vectors")
        vectorsLPS = sitk.GetArrayFromImage(displacement).astype(np.float64)  # [k, j, i, 3]
        vectorsRAS = vectorsLPS * np.array([-1.0, -1.0, 1.0])
        grid = vtk.vtkImageData()
        grid.SetDimensions(*[int(s) for s in displacement.GetSize()])
        grid.SetSpacing(*displacement.GetSpacing())
        grid.SetOrigin(*(LPS_TO_RAS @ np.array(displacement.GetOrigin())))
        vectors = vtk_np.numpy_to_vtk(np.ascontiguousarray(vectorsRAS.reshape(-1, 3)), deep=True,
                                      array_type=vtk.VTK_DOUBLE)
        vectors.SetNumberOfComponents(3)
        vectors.SetName("DisplacementRAS")
        grid.GetPointData().SetScalars(vectors)
        directionRAS = LPS_TO_RAS @ np.array(displacement.GetDirection()).reshape(3, 3)
        directionMatrix = vtk.vtkMatrix4x4()
        for r in range(3):
            for c in range(3):
                directionMatrix.SetElement(r, c, directionRAS[r, c])
        gridTransform = slicer.vtkOrientedGridTransform()
        gridTransform.SetDisplacementGridData(grid)
        gridTransform.SetGridDirectionMatrix(directionMatrix)
        gridTransform.SetInterpolationModeToLinear()
        transformNode.SetAndObserveTransformFromParent(gridTransform)

    @staticmethod
    def sitkToSegmentationNode(labelImage, segmentationNode, regionNames, labelValues, referenceVolumeNode=None):
        """Fill a segmentation node with one segment per region present in a label map (names = region names)."""
        import SimpleITK as sitk

        array = sitk.GetArrayFromImage(labelImage)
        origin = LPS_TO_RAS @ np.array(labelImage.GetOrigin())
        directionRAS = LPS_TO_RAS @ np.array(labelImage.GetDirection()).reshape(3, 3)
        ijkToRas = vtk.vtkMatrix4x4()
        scaled = directionRAS @ np.diag(labelImage.GetSpacing())
        for r in range(3):
            for c in range(3):
                ijkToRas.SetElement(r, c, scaled[r, c])
            ijkToRas.SetElement(r, 3, origin[r])
        segmentationNode.GetSegmentation().RemoveAllSegments()
        if referenceVolumeNode is not None:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
        for index, (name, value) in enumerate(zip(regionNames, labelValues)):
            mask = (array == value).astype(np.uint8)
            if not mask.any():
                continue
            layer = slicer.vtkOrientedImageData()
            layer.SetDimensions(*[int(s) for s in labelImage.GetSize()])
            layer.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
            vtk_np.vtk_to_numpy(layer.GetPointData().GetScalars())[:] = mask.ravel()
            layer.SetImageToWorldMatrix(ijkToRas)
            segmentationNode.AddSegmentFromBinaryLabelmapRepresentation(
                layer, name, list(SEGMENT_COLORS[index % len(SEGMENT_COLORS)]))
        return segmentationNode

    # -- example pair -------------------------------------------------------------------------------------------------

    def loadExamplePair(self, scene=None, pair=None):
        """Generate the example pair (``textscf.phantom.make_example_pair``) into the scene.

        ``pair`` may be an already generated pair (the generator's dict). Returns ``fixedVolumeNode``,
        ``movingVolumeNode``, ``fixedSegmentationNode``, ``movingSegmentationNode``, and the pair's
        ``regionNames`` / ``labelValues``.
        """
        scene = scene or self.scene
        if pair is None:
            from textscf.phantom import make_example_pair

            pair = make_example_pair()
        labels = [pair[k] for k in ("fixed_labels", "moving_labels") if pair.get(k) is not None]
        regionNames, labelValues = _exampleRegions(pair, labels)
        nodeIdsBefore = _nodeIds(scene)
        try:
            nodes = {"regionNames": regionNames, "labelValues": labelValues}
            for key, nodeKey, name in (("fixed", "fixedVolumeNode", "TextSCF example fixed"),
                                       ("moving", "movingVolumeNode", "TextSCF example moving")):
                node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
                self.updateVolumeNodeFromSitk(node, pair[key])
                node.CreateDefaultDisplayNodes()
                nodes[nodeKey] = node
            for key, nodeKey, name, volumeKey in (
                    ("fixed_labels", "fixedSegmentationNode", "TextSCF example fixed segmentation", "fixedVolumeNode"),
                    ("moving_labels", "movingSegmentationNode", "TextSCF example moving segmentation",
                     "movingVolumeNode")):
                if pair.get(key) is None:
                    nodes[nodeKey] = None
                    continue
                node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
                node.CreateDefaultDisplayNodes()
                self.sitkToSegmentationNode(pair[key], node, regionNames, labelValues, nodes[volumeKey])
                nodes[nodeKey] = node
            return nodes
        except BaseException:
            _removeNewNodes(scene, nodeIdsBefore)
            raise

    def selectExamplePairInParameterNode(self, nodes):
        """Preselect the example pair in the module (GUI only): Sample Data, then Apply."""
        if parameterNodeWrapper is None or self.scene is None:
            return
        p = self.getParameterNode()
        preset = self.presetMatching(nodes["regionNames"], nodes["labelValues"])
        with slicer.util.NodeModify(p):
            p.fixedVolume = nodes["fixedVolumeNode"]
            p.movingVolume = nodes["movingVolumeNode"]
            p.fixedSegmentation = nodes.get("fixedSegmentationNode")
            p.movingSegmentation = nodes.get("movingSegmentationNode")
            p.preset = preset or TextSCFRegistrationWidget.CUSTOM_PRESET
            p.regionsJson = json.dumps([[n, int(v)] for n, v in zip(nodes["regionNames"], nodes["labelValues"])])

    @staticmethod
    def presetMatching(regionNames, labelValues):
        """Name of the bundled preset with exactly these regions and label values (names compared loosely), or None."""
        from textscf.presets import list_presets, load_preset

        wanted = sorted((_normalizedName(n), int(v)) for n, v in zip(regionNames, labelValues))
        for name in list_presets():
            preset = load_preset(name)
            if sorted((_normalizedName(n), int(v)) for n, v in zip(preset.region_names, preset.label_values)) == wanted:
                return name
        return None

    # -- model fit ----------------------------------------------------------------------------------------------------

    @staticmethod
    def modelConfig(checkpoint=None):
        """The configuration (a dict: regions, text encoder, modality, grid) of a checkpoint; None = the bundled model.

        Needs PyTorch (the checkpoint is a torch file); reads the file without building the network, once per file
        version (the widget asks on every change of the regions).
        """
        from textscf.checkpoint import read_checkpoint_file
        from textscf.errors import CheckpointError
        from textscf.pipeline import bundled_model_path

        path = os.path.abspath(str(checkpoint or bundled_model_path()))
        stat = os.stat(path) if os.path.isfile(path) else None
        key = (path, stat.st_mtime_ns, stat.st_size) if stat else None
        if key is not None and key in _MODEL_CONFIGS:
            return _MODEL_CONFIGS[key]
        payload = read_checkpoint_file(path)
        if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
            raise CheckpointError(f"{path} is not a textscf checkpoint (no configuration in it)")
        _MODEL_CONFIGS[key] = payload["config"]
        return payload["config"]

    @staticmethod
    def refineSteps(automatic, iterations, fieldIterations, checkpoint=None):
        """The refinement-step options: None (the engine's default schedule) when ``automatic``, else the given ones.

        A fresh network asked for by name needs its steps spelled out: automatic gives it the schedule's.
        """
        if not automatic:
            return {"refine_iterations": int(iterations), "refine_field_iterations": int(fieldIterations)}
        if str(checkpoint or "").lower() == "fresh":
            from textscf.schedule import FRESH_FIELD_STEPS, FRESH_NETWORK_STEPS

            return {"refine_iterations": FRESH_NETWORK_STEPS, "refine_field_iterations": FRESH_FIELD_STEPS}
        return {"refine_iterations": None, "refine_field_iterations": None}

    @staticmethod
    def progressText(stage, secondsLeft=None):
        """The status line under the progress bar: the stage and, when known, the time left."""
        from textscf.schedule import describe_duration

        if secondsLeft is None:
            return stage
        return _("{0} ({1} left)").format(stage, describe_duration(secondsLeft))

    def modelPlan(self, options, fixedVolumeNode=None, torchAvailable=None):
        """What Apply will run: whether the chosen model can use the chosen regions, the schedule, the expected time.

        A one-hot model (the bundled one) knows only the regions it was trained with and its modality. For other
        regions (the brain preset, a new name such as "lung") or another modality, the plan switches to a fresh
        network refined on the pair (the engine's fresh schedule, ``textscf.schedule.FRESH_NETWORK_STEPS`` +
        ``FRESH_FIELD_STEPS`` iterations, or more if asked) and says so, with the expected time. The steps are the
        engine's default schedule (``textscf.schedule.default_schedule``) when ``refine_iterations`` is None.

        :param options: dict of ``RegistrationOptions`` fields (as the widget builds them).
        :param fixedVolumeNode: sizes the fresh network's grid for the time estimate (optional).
        :param torchAvailable: whether PyTorch can be imported (default: checked); without it a checkpoint cannot be
            read, so the plan says the check happens on Apply.
        :return: dict with ``switched`` (bool), ``options`` (the options to run with), ``message`` (for the user;
            empty when there is nothing to say) and ``estimatedSeconds`` (refinement time, None when unknown).
        """
        import importlib.util

        from textscf import schedule as plans
        from textscf.presets import load_preset, model_rows

        options = dict(options or {})
        device = "cuda" if (options.get("device", "auto") != "cpu" and self.cudaAvailable()) else "cpu"
        deviceLabel = _("the GPU") if device == "cuda" else _("the CPU")
        preset = load_preset(options["preset"]) if options.get("preset") else None
        names = options.get("region_names") or (list(preset.region_names) if preset else None)
        plan = {"switched": False, "options": options, "message": "", "estimatedSeconds": None}

        def fixedSize():
            if fixedVolumeNode is None or fixedVolumeNode.GetImageData() is None:
                return None
            return fixedVolumeNode.GetImageData().GetDimensions()

        def steps():
            """(network, field) steps of the options: None = the default schedule (automatic); absent =
            RegistrationOptions' default, no refinement."""
            return options.get("refine_iterations", 0), options.get("refine_field_iterations", 0)

        def schedule(network, grid):
            """The engine's schedule for this network and grid, with the steps of the options when they are set."""
            return plans.with_steps(plans.default_schedule(network, grid, device), *steps())

        def describeFresh(prefix):
            size = fixedSize()
            factor = options.get("fresh_grid_factor")
            grid = None if size is None else (plans.fresh_grid_for(size, device) if factor is None
                                              else plans.fresh_grid_shape(size, float(factor)))
            chosen = schedule("fresh", grid or (16, 16, 16))
            text = prefix + _("a fresh network refined on this pair: {0} + {1} iterations").format(
                chosen.network_steps, chosen.field_steps)
            if grid is not None:
                plan["estimatedSeconds"] = chosen.estimated_seconds
                text += _(", {0} on {1}").format(plans.describe_duration(chosen.estimated_seconds), deviceLabel)
            return text + "."

        checkpoint = options.get("checkpoint")
        if str(checkpoint or "").lower() == "fresh":
            if steps()[0] is None or int(steps()[0]) > 0:
                plan["message"] = describeFresh(_("Model: "))
            else:
                plan["message"] = _("A fresh network must be refined on the pair: set 'Refine on this pair' above 0.")
            return plan
        if torchAvailable is None:
            torchAvailable = importlib.util.find_spec("torch") is not None
        if not torchAvailable:
            plan["message"] = _("The model is checked against the regions on Apply, once PyTorch is installed.")
            return plan
        config = self.modelConfig(checkpoint)
        modelName = _("the bundled model") if not checkpoint else _("the chosen model")
        problems = []
        if config.get("text_encoder", "onehot") == "onehot" and names is not None:
            _rows, unknown = model_rows(config.get("region_names", []), names)
            if unknown:
                shown = ", ".join(unknown[:4]) + (_(" and {0} more").format(len(unknown) - 4) if len(unknown) > 4
                                                  else "")
                problems.append(_("{0} knows only its {1} training regions (one-hot prompts), not {2}").format(
                    modelName, len(config.get("region_names", [])), shown))
        if preset is not None and config.get("modality") and preset.modality != config["modality"]:
            problems.append(_("{0} was trained on {1}, not {2}").format(
                modelName, config["modality"].upper(), preset.modality.upper()))
        if not problems:
            if config.get("input_shape"):
                chosen = schedule("checkpoint", config["input_shape"])
                if chosen.steps > 0:
                    plan["estimatedSeconds"] = chosen.estimated_seconds
                    plan["message"] = _("Model: {0}, refined on this pair ({1} + {2} iterations, {3} on {4}).").format(
                        modelName, chosen.network_steps, chosen.field_steps,
                        plans.describe_duration(chosen.estimated_seconds), deviceLabel)
            return plan
        requested, requestedField = steps()
        options.update(checkpoint="fresh",
                       refine_iterations=max(int(requested or 0), plans.FRESH_NETWORK_STEPS),
                       refine_field_iterations=max(int(requestedField or 0), plans.FRESH_FIELD_STEPS))
        plan["switched"] = True
        plan["message"] = describeFresh("; ".join(problems)[:1].upper() + "; ".join(problems)[1:]
                                        + _(". Apply will use "))
        return plan

    # -- registration -------------------------------------------------------------------------------------------------

    def requestCancel(self):
        self.cancelRequested = True

    @staticmethod
    def _resolveOptions(options):
        import dataclasses

        from textscf.pipeline import RegistrationOptions

        if options is None:
            return RegistrationOptions()
        if isinstance(options, dict):
            return RegistrationOptions(**options)
        if dataclasses.is_dataclass(options):
            return options
        raise TypeError("options must be a RegistrationOptions, a dict of its fields, or None")

    def process(self, fixedVolumeNode, movingVolumeNode, options=None, fixedSegmentationNode=None,
                movingSegmentationNode=None, initialTransformNode=None, outputTransformNode=None,
                outputVolumeNode=None, jacobianVolumeNode=None, statsTableNode=None,
                showDisplacementMagnitude=False, progressCallback=None, cancelCallback=None, showResult=True):
        """Register ``movingVolumeNode`` to ``fixedVolumeNode`` with the engine and put the results in the scene.

        :param options: ``textscf.pipeline.RegistrationOptions``, a dict of its fields, or None (defaults).
        :param fixedSegmentationNode: segmentation or labelmap giving the fixed regions. Without it, and with
            ``segmentor_weights`` in the options, both volumes are segmented automatically (SwinUNETR, see
            ``segmentVolumes``): the segmentations appear in the scene as segmentation nodes (returned as
            ``fixedSegmentationNode`` and ``movingSegmentationNode``) to inspect, correct and give back.
        :param movingSegmentationNode: segmentation or labelmap of the moving volume, for Dice/HD95.
        :param initialTransformNode: transform that aligns the moving volume to the fixed one (optional).
        :param outputTransformNode: transform node to fill (created when None).
        :param outputVolumeNode: volume to fill with the warped moving volume; when None the moving volume (and
            moving segmentation) is placed under the output transform instead.
        :param jacobianVolumeNode, statsTableNode: nodes to fill (created when None).
        :param progressCallback: ``f(stage: str, fraction: float, secondsLeft: float or None)``, the engine's numbers
            (the command line's bar shows the same): the fraction of the whole run moves with every refinement step,
            ``secondsLeft`` is an estimate. A callback taking ``(stage, fraction)`` gets the stage starts.
        :param cancelCallback: ``f() -> bool``, polled between stages and before every refinement step; True cancels
            (CancelledError).
        :return: dict of the created or filled nodes: ``outputTransformNode``, ``outputVolumeNode``,
            ``jacobianVolumeNode``, ``statsTableNode``, ``displacementMagnitudeVolumeNode``, ``jacobianColorNode``.

        On failure or cancel the scene is left as it was: created nodes are removed, existing output nodes restored.
        """
        import dataclasses

        from textscf.errors import CancelledError, InputError
        from textscf.pipeline import takes_seconds_left

        self.cancelRequested = False
        self.notes = []
        startTime = time.time()
        withSteps = progressCallback is not None and takes_seconds_left(progressCallback)

        def report(stage, fraction, secondsLeft=None):
            logging.debug("TextSCF: %s (%.0f%%)", stage, 100 * fraction)
            if progressCallback is None:
                return
            fraction = float(min(1.0, max(0.0, fraction)))
            if withSteps:
                progressCallback(stage, fraction, secondsLeft)
            else:
                progressCallback(stage, fraction)

        def isCancelled():
            return bool(self.cancelRequested or (cancelCallback is not None and cancelCallback()))

        if fixedVolumeNode is None or movingVolumeNode is None:
            raise InputError("select both a fixed and a moving volume")
        if fixedVolumeNode is movingVolumeNode:
            raise InputError("the fixed and moving volumes must be different nodes")
        scene = fixedVolumeNode.GetScene()
        if scene is None or movingVolumeNode.GetScene() is not scene:
            raise InputError("the fixed and moving volumes must be in the same scene")
        for node, role in ((fixedVolumeNode, "fixed"), (movingVolumeNode, "moving")):
            parent = node.GetParentTransformNode()
            if parent is not None and parent.GetAttribute("TextSCF.Output") != "transform":
                logging.warning("TextSCF: the %s volume '%s' is under a transform; registration uses its voxels "
                                "without that transform (give it as the initial transform to use it)",
                                role, node.GetName())

        report(_("Reading inputs"), 0.0)
        fixed = self.volumeNodeToSitk(fixedVolumeNode)
        moving = self.volumeNodeToSitk(movingVolumeNode)
        options = self._resolveOptions(options)

        names, values = options.region_names, options.label_values
        if names is None and options.preset:
            from textscf.presets import load_preset

            preset = load_preset(options.preset)
            names, values = list(preset.region_names), list(preset.label_values)
        fixedLabels = movingLabels = None
        if fixedSegmentationNode is not None:
            fixedLabels, names, values = self.labelImageFromNode(fixedSegmentationNode, fixedVolumeNode, names, values)
        if movingSegmentationNode is not None:
            movingLabels, names, values = self.labelImageFromNode(movingSegmentationNode, movingVolumeNode, names,
                                                                  values)
        autoSegment = fixedSegmentationNode is None and bool(options.segmentor_weights)
        if autoSegment and names is None:
            from textscf.segmentation import btcv_bundle_region_names

            names = btcv_bundle_region_names()
            values = list(range(1, len(names) + 1))
        if options.region_names is None and options.preset is None and names is not None:
            options = dataclasses.replace(options, region_names=list(names), label_values=list(values))
        initialTransform = None
        if initialTransformNode is not None:
            initialTransform = self.transformNodeToSitk(initialTransformNode, fixedVolumeNode)

        if isCancelled():
            raise CancelledError("registration cancelled before it started")
        nodeIdsBefore = _nodeIds(scene)
        try:
            nodes = {}
            if autoSegment:
                images = [fixed] if movingSegmentationNode is not None else [fixed, moving]
                labelImages = self._run(lambda: self.segmentVolumes(
                    images, names, values, options.segmentor_weights, options.segmentor_feature_size,
                    options.device, progressCallback=lambda stage, fraction: report(stage, 0.01 + 0.04 * fraction),
                    cancelCallback=isCancelled))
                fixedLabels = labelImages[0]
                nodes["fixedSegmentationNode"] = self._segmentationNodeFor(fixedLabels, fixedVolumeNode, names,
                                                                           values)
                if movingSegmentationNode is None:
                    movingLabels = labelImages[1]
                    movingSegmentationNode = self._segmentationNodeFor(movingLabels, movingVolumeNode, names,
                                                                       values)
                    nodes["movingSegmentationNode"] = movingSegmentationNode
            report(_("Loading the engine"), 0.05)
            from textscf.pipeline import register

            def runPipeline():
                return register(fixed, moving, options, fixed_labels=fixedLabels, moving_labels=movingLabels,
                                initial_transform=initialTransform,
                                progress=lambda stage, fraction, secondsLeft: report(
                                    stage, 0.05 + 0.85 * fraction, secondsLeft),
                                cancel=isCancelled, log=self._log)

            result = self._run(runPipeline)
        except BaseException:
            _removeNewNodes(scene, nodeIdsBefore)  # the automatic segmentations, if any
            raise
        if "seconds_total" not in result.stats:
            result.stats["seconds_total"] = time.time() - startTime
        if self.notes:
            result.stats.setdefault("notes", []).extend(self.notes)
        self.lastResult = result

        try:
            for node in (fixedVolumeNode, movingVolumeNode):
                if node.GetScene() is not scene:
                    raise InputError(f"volume '{node.GetName()}' was removed from the scene during the registration")
            nodes.update(self.createOutputNodes(
                result, fixedVolumeNode, movingVolumeNode, outputTransformNode=outputTransformNode,
                outputVolumeNode=outputVolumeNode, jacobianVolumeNode=jacobianVolumeNode,
                statsTableNode=statsTableNode, movingSegmentationNode=movingSegmentationNode,
                showDisplacementMagnitude=showDisplacementMagnitude,
                progressCallback=lambda stage, fraction: report(stage, 0.9 + 0.1 * fraction),
                cancelCallback=isCancelled))
        except BaseException:
            _removeNewNodes(scene, nodeIdsBefore)
            raise
        self.lastNodes = nodes
        if showResult:
            self.showResults(nodes, fixedVolumeNode)
        report(_("Done"), 1.0)
        return nodes

    def _log(self, line):
        """The engine's lines for the user (the schedule it runs): the log, and the notes of the result."""
        logging.info("TextSCF: %s", line)
        self.notes.append(line)

    def _run(self, call):
        """Run an engine call (touches no MRML node) through ``pipelineRunner`` (the widget's worker thread)."""
        return self.pipelineRunner(call) if self.pipelineRunner is not None else call()

    # Keyword arguments for the SwinUNETR segmentor beyond weights and feature size (roi_size, target_spacing,
    # overlap, ...); empty = MONAI's BTCV settings.
    segmentorSettings = {}

    def segmentVolumes(self, images, regionNames, labelValues, weights, featureSize=48, device="auto",
                       progressCallback=None, cancelCallback=None):
        """Segment images (SimpleITK) with SwinUNETR; returns one label map per image, with the regions' values.

        The network's classes are those of MONAI's BTCV bundle (``btcv_bundle_region_names``); each class named as
        a region (aliases resolved) gets the region's label value, other classes are background, regions the
        network does not segment stay empty. Touches no MRML node: the widget runs it on its worker thread.
        """
        import SimpleITK as sitk

        from textscf.errors import CancelledError
        from textscf.pipeline import select_device
        from textscf.presets import same_region
        from textscf.segmentation import SwinUNETRSegmentor, btcv_bundle_region_names

        classes = btcv_bundle_region_names()
        lookup = np.zeros(len(classes) + 1, np.int32)
        for index, className in enumerate(classes, start=1):
            for name, value in zip(regionNames, labelValues):
                if same_region(name, className):
                    lookup[index] = int(value)
        torchDevice, _note = select_device(device)
        segmentor = SwinUNETRSegmentor(weights, classes, feature_size=int(featureSize), device=str(torchDevice),
                                       **dict(self.segmentorSettings))
        labelImages = []
        for number, image in enumerate(images):
            if cancelCallback is not None and cancelCallback():
                raise CancelledError("registration cancelled during the automatic segmentation")
            if progressCallback is not None:
                progressCallback(_("Segmenting the fixed image") if number == 0 else _("Segmenting the moving image"),
                                 number / len(images))
            segmentation = segmentor.predict(image)
            labels = sitk.GetImageFromArray(lookup[sitk.GetArrayViewFromImage(segmentation.labels)])
            labels.CopyInformation(image)
            labelImages.append(labels)
        return labelImages

    def _segmentationNodeFor(self, labelImage, volumeNode, regionNames, labelValues):
        """A new segmentation node in the scene holding an automatic segmentation of ``volumeNode``."""
        scene = volumeNode.GetScene()
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                       scene.GenerateUniqueName(f"{volumeNode.GetName()} TextSCF segmentation"))
        node.CreateDefaultDisplayNodes()
        self.sitkToSegmentationNode(labelImage, node, regionNames, labelValues, volumeNode)
        node.SetAttribute("TextSCF.Output", "automatic segmentation")
        return node

    def createOutputNodes(self, result, fixedVolumeNode, movingVolumeNode, outputTransformNode=None,
                          outputVolumeNode=None, jacobianVolumeNode=None, statsTableNode=None,
                          movingSegmentationNode=None, showDisplacementMagnitude=False, progressCallback=None,
                          cancelCallback=None):
        """Put a ``RegistrationResult`` into the scene (see ``process``); all or nothing.

        ``cancelCallback`` is polled between the nodes: cancelling or any error removes the nodes created here,
        restores the content of the given output nodes and the parent transforms that were changed.
        """
        from textscf.errors import CancelledError

        scene = fixedVolumeNode.GetScene()
        nodeIdsBefore = _nodeIds(scene)
        backups = []           # (node, copy of its content before we changed it)
        parentChanges = []     # (node, previous parent transform ID)
        referenceChanges = []  # (node, role, previous referenced node ID)
        attributeChanges = []  # (node, previous value of the TextSCF.Output attribute)

        def step(stage, fraction):
            if cancelCallback is not None and cancelCallback():
                raise CancelledError("registration cancelled while creating the output nodes")
            if progressCallback is not None:
                progressCallback(stage, fraction)

        def prepare(node, className, name):
            if node is None:
                return scene.AddNewNodeByClass(className, scene.GenerateUniqueName(name))
            backup = getattr(slicer, node.GetClassName())()
            backup.CopyContent(node)
            backups.append((node, backup))
            displayNode = node.GetDisplayNode() if hasattr(node, "GetDisplayNode") else None
            if displayNode is not None:
                displayBackup = getattr(slicer, displayNode.GetClassName())()
                displayBackup.CopyContent(displayNode)
                backups.append((displayNode, displayBackup))
            return node

        def setReference(node, role, nodeId):
            referenceChanges.append((node, role, node.GetNodeReferenceID(role)))
            node.SetNodeReferenceID(role, nodeId)

        def markOutput(node, kind):
            attributeChanges.append((node, node.GetAttribute("TextSCF.Output")))
            node.SetAttribute("TextSCF.Output", kind)

        def setParent(node, transformId):
            if node.GetTransformNodeID() != transformId:
                parentChanges.append((node, node.GetTransformNodeID()))
                node.SetAndObserveTransformNodeID(transformId)

        fixedParentId = fixedVolumeNode.GetTransformNodeID()
        baseName = f"{movingVolumeNode.GetName()} to {fixedVolumeNode.GetName()}"
        nodes = {}
        try:
            step(_("Creating the output transform"), 0.0)
            transformNode = prepare(outputTransformNode, "vtkMRMLGridTransformNode", f"{baseName} (TextSCF)")
            self.setGridTransformFromDisplacement(transformNode, result.displacement)
            setReference(transformNode, self.FIXED_VOLUME_REFERENCE_ROLE, fixedVolumeNode.GetID())
            setReference(transformNode, self.MOVING_VOLUME_REFERENCE_ROLE, movingVolumeNode.GetID())
            markOutput(transformNode, "transform")
            # The transform maps fixed-volume coordinates; under the fixed volume's own parent it stays consistent.
            setParent(transformNode, fixedParentId)
            nodes["outputTransformNode"] = transformNode

            step(_("Creating the warped volume"), 0.2)
            nodes["outputVolumeNode"] = None
            if outputVolumeNode is not None:
                warpedNode = prepare(outputVolumeNode, "vtkMRMLScalarVolumeNode", f"{baseName} warped")
                self._fillOnFixedGrid(warpedNode, result.warped, fixedVolumeNode)
                markOutput(warpedNode, "warped")
                setParent(warpedNode, fixedParentId)
                if warpedNode.GetDisplayNode() is None:
                    warpedNode.CreateDefaultDisplayNodes()
                nodes["outputVolumeNode"] = warpedNode

            step(_("Creating the Jacobian map"), 0.4)
            jacobianNode = prepare(jacobianVolumeNode, "vtkMRMLScalarVolumeNode", f"{baseName} Jacobian")
            self._fillOnFixedGrid(jacobianNode, result.jacobian, fixedVolumeNode)
            markOutput(jacobianNode, "jacobian")
            setParent(jacobianNode, fixedParentId)
            colorNode = self.jacobianColorNode(scene)
            self.setupJacobianDisplay(jacobianNode, colorNode)
            nodes["jacobianVolumeNode"] = jacobianNode
            nodes["jacobianColorNode"] = colorNode

            step(_("Creating the displacement magnitude"), 0.6)
            nodes["displacementMagnitudeVolumeNode"] = None
            if showDisplacementMagnitude:
                import SimpleITK as sitk

                magnitudeNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                                        scene.GenerateUniqueName(f"{baseName} displacement (mm)"))
                vectors = sitk.GetArrayFromImage(result.displacement)
                magnitude = sitk.GetImageFromArray(np.linalg.norm(vectors, axis=-1).astype(np.float32))
                magnitude.CopyInformation(result.displacement)
                self._fillOnFixedGrid(magnitudeNode, magnitude, fixedVolumeNode)
                markOutput(magnitudeNode, "displacement magnitude")
                setParent(magnitudeNode, fixedParentId)
                magnitudeNode.CreateDefaultDisplayNodes()
                nodes["displacementMagnitudeVolumeNode"] = magnitudeNode

            step(_("Filling the table"), 0.8)
            tableNode = prepare(statsTableNode, "vtkMRMLTableNode", f"{baseName} TextSCF statistics")
            self.fillStatsTable(tableNode, result.stats, result.region_names)
            markOutput(tableNode, "statistics")
            nodes["statsTableNode"] = tableNode

            step(_("Placing the moving volume under the transform"), 0.9)
            if outputVolumeNode is None:
                setParent(movingVolumeNode, transformNode.GetID())
                if movingSegmentationNode is not None:
                    setParent(movingSegmentationNode, transformNode.GetID())
            step(_("Outputs ready"), 1.0)
        except BaseException:
            # Leave the scene as it was: new nodes out, given nodes back to their content, parents restored.
            for node, previousId in reversed(parentChanges):
                if node.GetScene() is not None:
                    node.SetAndObserveTransformNodeID(previousId)
            for node, role, previousId in reversed(referenceChanges):
                if node.GetScene() is not None:
                    node.SetNodeReferenceID(role, previousId)
            for node, previousValue in reversed(attributeChanges):
                if node.GetScene() is not None:
                    if previousValue is None:
                        node.RemoveAttribute("TextSCF.Output")
                    else:
                        node.SetAttribute("TextSCF.Output", previousValue)
            _removeNewNodes(scene, nodeIdsBefore)
            for node, backup in reversed(backups):
                if node.GetScene() is not None:
                    node.CopyContent(backup)
            raise
        self.lastNodes = nodes
        return nodes

    def _fillOnFixedGrid(self, volumeNode, image, fixedVolumeNode):
        """Fill a volume with an image on the fixed grid, taking the geometry exactly from the fixed volume."""
        self.updateVolumeNodeFromSitk(volumeNode, image)
        fixedDims = fixedVolumeNode.GetImageData().GetDimensions()
        if tuple(int(s) for s in image.GetSize()) == tuple(fixedDims):
            fixedOrigin, _spacing, _direction = self.volumeNodeGeometryLPS(fixedVolumeNode)
            if np.allclose(fixedOrigin, image.GetOrigin(), atol=1e-3 * max(image.GetSpacing())):
                volumeNode.CopyOrientation(fixedVolumeNode)

    # -- presentation -------------------------------------------------------------------------------------------------

    @staticmethod
    def jacobianColors():
        """RGB of the 256 entries of the Jacobian table and the Jacobian value at the centre of each entry."""
        colors, centres = [], []
        for index in range(JACOBIAN_TABLE_SIZE):
            centre = JACOBIAN_DISPLAY_MIN + (index + 0.5) * JACOBIAN_BIN
            centres.append(centre)
            if index == 0:
                colors.append(JACOBIAN_FOLDING_COLOR)
            elif centre < 1.0:
                t = 1.0 - max(0.0, centre)  # 0 at |J| = 1, 1 at |J| = 0
                colors.append(tuple(1.0 + t * (c - 1.0) for c in JACOBIAN_LOW_COLOR))
            else:
                t = min(1.0, centre - 1.0)  # 0 at |J| = 1, 1 at |J| = 2
                colors.append(tuple(1.0 + t * (c - 1.0) for c in JACOBIAN_HIGH_COLOR))
        return colors, centres

    def jacobianColorNode(self, scene=None):
        """The diverging Jacobian colour table (blue < 1 < red, white at 1, green for |J| <= 0); made once per scene."""
        scene = scene or self.scene
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
            node = scene.GetNthNodeByClass(index, "vtkMRMLColorTableNode")
            if node.GetAttribute("TextSCF.ColorTable") == "Jacobian":
                return node
        node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", JACOBIAN_COLOR_NODE_NAME)
        node.SetTypeToUser()
        node.SetNumberOfColors(JACOBIAN_TABLE_SIZE)
        colors, centres = self.jacobianColors()
        for index, (rgb, centre) in enumerate(zip(colors, centres)):
            name = "folding |J| <= 0" if index == 0 else f"|J| {centre:.3f}"
            node.SetColor(index, name, rgb[0], rgb[1], rgb[2], 1.0)
        node.SetAttribute("TextSCF.ColorTable", "Jacobian")
        node.SetAttribute("Category", "TextSCF")
        node.SetDescription("Jacobian determinant: blue < 1 (compression) < white at 1 < red (expansion), "
                            "bright green where |J| <= 0 (folding)")
        return node

    @staticmethod
    def setupJacobianDisplay(jacobianNode, colorNode):
        """Show the Jacobian with the diverging table, window fixed so that |J| = 1 is white."""
        displayNode = jacobianNode.GetDisplayNode()
        if displayNode is None:
            jacobianNode.CreateDefaultDisplayNodes()
            displayNode = jacobianNode.GetDisplayNode()
        displayNode.SetAndObserveColorNodeID(colorNode.GetID())
        displayNode.AutoWindowLevelOff()
        displayNode.SetWindowLevelMinMax(JACOBIAN_DISPLAY_MIN, JACOBIAN_DISPLAY_MAX)
        displayNode.SetInterpolate(False)

    @staticmethod
    def statsRows(stats, regionNames=()):
        """Rows (measure, region, value, before, note) of the statistics table."""
        nan = float("nan")

        def number(value):
            return nan if value is None else float(value)

        rows = [
            ("SDlogJ", "", number(stats.get("sdlogj")), nan, "std of log |J| (Learn2Reg)"),
            ("Folding |J| <= 0 (%)", "", number(stats.get("folding_percent")), nan, "percent of fixed voxels"),
            ("Jacobian min", "", number(stats.get("jacobian_min")), nan, ""),
            ("Jacobian max", "", number(stats.get("jacobian_max")), nan, ""),
            ("Max displacement (mm)", "", number(stats.get("max_displacement_mm")), nan, ""),
            ("Run time (s)", "", number(stats.get("seconds_total")), nan, ""),
        ]
        for stage, seconds in (stats.get("seconds_per_stage") or {}).items():
            rows.append((f"Run time: {stage} (s)", "", number(seconds), nan, ""))
        rows.append(("Device", "", nan, nan, str(stats.get("device", ""))))
        if stats.get("device_note"):
            rows.append(("Device note", "", nan, nan, str(stats["device_note"])))
        if stats.get("initial_alignment"):
            rows.append(("Initial alignment", "", nan, nan, str(stats["initial_alignment"])))
        for note in stats.get("notes") or ():
            rows.append(("Note", "", nan, nan, str(note)))
        ordered = [n for n in regionNames[1:]] if regionNames else []
        for key, measure in (("dice", "Dice"), ("hd95_mm", "HD95 (mm)")):
            after = stats.get(key) or {}
            before = stats.get(f"{key}_before") or {}
            names = [n for n in ordered if n in after or n in before]
            names += [n for n in list(after) + list(before) if n not in names]
            for name in dict.fromkeys(names):
                rows.append((measure, name, number(after.get(name)), number(before.get(name)), ""))
            if f"mean_{key}" in stats or f"mean_{key}_before" in stats:
                rows.append((measure, "mean", number(stats.get(f"mean_{key}")),
                             number(stats.get(f"mean_{key}_before")), "mean over regions"))
        return rows

    def fillStatsTable(self, tableNode, stats, regionNames=()):
        """Columns Measure, Region, Value, Before (Dice/HD95 before registration), Note."""
        rows = self.statsRows(stats, regionNames)
        table = vtk.vtkTable()
        for column, (name, kind) in enumerate(TABLE_COLUMNS):
            array = vtk.vtkStringArray() if kind == "string" else vtk.vtkDoubleArray()
            array.SetName(name)
            for row in rows:
                if kind == "string":
                    array.InsertNextValue(row[column])
                else:
                    array.InsertNextValue(row[column])
            table.AddColumn(array)
        tableNode.SetAndObserveTable(table)
        if hasattr(tableNode, "SetUseColumnTitleAsColumnHeader"):  # column titles default to the names
            tableNode.SetUseColumnTitleAsColumnHeader(True)
        tableNode.SetColumnDescription("Value", "after registration")
        tableNode.SetColumnDescription("Before", "before registration (Dice and HD95 only)")
        return tableNode

    def summary(self):
        """One line on the last run, for the status label."""
        if self.lastResult is None:
            return ""
        stats = self.lastResult.stats
        parts = [_("Done in {0:.1f} s on {1}").format(float(stats.get("seconds_total", 0.0)), stats.get("device", "?"))]
        if stats.get("sdlogj") is not None:
            parts.append(f"SDlogJ {float(stats['sdlogj']):.3f}")
        if stats.get("folding_percent") is not None:
            parts.append(f"|J|<=0 {float(stats['folding_percent']):.2f}%")
        if stats.get("mean_dice") is not None:
            before = stats.get("mean_dice_before")
            parts.append(f"Dice {float(before):.3f} -> {float(stats['mean_dice']):.3f}" if before is not None
                         else f"Dice {float(stats['mean_dice']):.3f}")
        return ", ".join(parts)

    def showResults(self, nodes, fixedVolumeNode):
        """In the application: fixed volume in the background, Jacobian overlay in the foreground, colour legend."""
        if not SLICER_APP_AVAILABLE:
            return
        jacobianNode = nodes.get("jacobianVolumeNode")
        slicer.util.setSliceViewerLayers(background=fixedVolumeNode, foreground=jacobianNode, foregroundOpacity=0.4)
        try:
            slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(jacobianNode)
        except AttributeError:
            logging.debug("TextSCF: no colour legend support in this Slicer version")


#
# Helpers
#


def _normalizedName(name):
    """A region name compared loosely, other tools' names resolved ("kidney_right" and "Right Kidney" are equal)."""
    from textscf.presets import canonical_region_name, normalized_name

    return normalized_name(canonical_region_name(name))


def _canonicalName(name):
    """The preset's name of a region named by another tool (TotalSegmentator's "kidney_right" -> "right kidney")."""
    from textscf.presets import canonical_region_name

    return canonical_region_name(name)


def _nodeIds(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _removeNewNodes(scene, nodeIdsBefore):
    """Remove the nodes added to the scene since ``nodeIdsBefore`` (newest first).

    Removing a node may remove others with it (display nodes), so the list is taken first and each node is removed
    only if it is still in the scene.
    """
    newNodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    newNodes = [node for node in newNodes if node is not None and node.GetID() not in nodeIdsBefore]
    for node in reversed(newNodes):
        if node.GetScene() is scene:
            scene.RemoveNode(node)


def _arrayFromVTKMatrix(matrix):
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _arrayFromVolume(volumeNode):
    """Voxels ``[k, j, i]`` (a view); slicer.util when available, else straight from the vtkImageData."""
    if hasattr(slicer.util, "arrayFromVolume"):
        return slicer.util.arrayFromVolume(volumeNode)
    imageData = volumeNode.GetImageData()
    dims = imageData.GetDimensions()
    return vtk_np.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])


def _updateVolumeFromArray(volumeNode, array):
    """Deep-copy a ``[k, j, i]`` array into a volume node (slicer.util when available)."""
    array = np.ascontiguousarray(array)
    if hasattr(slicer.util, "updateVolumeFromArray"):
        slicer.util.updateVolumeFromArray(volumeNode, array)
        return
    imageData = volumeNode.GetImageData()
    if imageData is None:
        imageData = vtk.vtkImageData()
        volumeNode.SetAndObserveImageData(imageData)
    imageData.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    imageData.AllocateScalars(vtk_np.get_vtk_array_type(array.dtype), 1)
    vtk_np.vtk_to_numpy(imageData.GetPointData().GetScalars())[:] = array.ravel()
    volumeNode.StorableModified()
    volumeNode.Modified()


def _imageFromArray(array, referenceVolumeNode):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    origin, spacing, direction = TextSCFRegistrationLogic.volumeNodeGeometryLPS(referenceVolumeNode)
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    return image


def _sameGrid(a, b, tolerance=1e-4):
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance * max(b.GetSpacing()))
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=tolerance)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))


def _exampleRegions(pair, labelImages):
    """Region names and label values of the example pair: the generator's ``label_names`` ({value: name}) when
    given, else ``region_names``/``label_values``, else the values present in the label maps."""
    labelNames = pair.get("label_names")
    if labelNames:
        values = sorted(int(v) for v in labelNames)
        return [str(labelNames[v]) for v in values], values
    names = pair.get("region_names")
    if names is not None:
        values = pair.get("label_values")
        if values is None:
            names = [n for n in names if _normalizedName(n) != "background"]
            values = list(range(1, len(names) + 1))
        return list(names), [int(v) for v in values]
    import SimpleITK as sitk

    present = sorted({int(v) for image in labelImages for v in np.unique(sitk.GetArrayViewFromImage(image)) if v})
    return [f"region {v}" for v in present], present


#
# TextSCFRegistrationTest
#


class TextSCFRegistrationTest(ScriptedLoadableModuleTest):
    """Self-test (Slicer's Reload & Test, ctest): register the example pair on the CPU with small settings.

    Also runs without the application (slicer-core), on a scene of its own.
    """

    def setUp(self):
        if hasattr(slicer, "mrmlScene"):
            self.scene = slicer.mrmlScene
            self.scene.Clear()
        else:
            self.scene = slicer.vtkMRMLScene()

    def runTest(self):
        """Run the test, or skip it with a message where the engine's dependencies are not installed (as on a build
        machine: the module installs them on the first Apply, after asking)."""
        self.setUp()
        self.skipReason = self.missingDependenciesMessage()
        if self.skipReason:
            self.delayDisplay(self.skipReason)
            return
        self.test_RegisterExamplePair()

    @staticmethod
    def missingDependenciesMessage():
        """Why the test cannot run here (the missing packages and how to get them), or "" when it can."""
        import importlib.util

        missing = TextSCFRegistrationLogic.missingRequirements()
        if importlib.util.find_spec("torch") is None:
            missing.insert(0, "torch" + TORCH_REQUIREMENT)
        if not missing:
            return ""
        return _("TextSCF self-test skipped: the registration engine needs {0}, which is not installed. Open the "
                 "TextSCF Registration module and press Apply once (it offers to install them), then run the test "
                 "again.").format(", ".join(missing))

    def test_RegisterExamplePair(self):
        self.delayDisplay("Generating the example pair")
        logic = TextSCFRegistrationLogic(scene=self.scene)
        pair = logic.loadExamplePair(self.scene)
        fixedNode, movingNode = pair["fixedVolumeNode"], pair["movingVolumeNode"]
        self.assertIsNotNone(pair["movingSegmentationNode"])

        self.delayDisplay("Registering on the CPU")
        stages = []
        options = {"device": "cpu", "init": "center", "refine_iterations": 10, "seed": 0}
        preset = logic.presetMatching(pair["regionNames"], pair["labelValues"])
        if preset:
            options["preset"] = preset
        else:
            options.update(region_names=pair["regionNames"], label_values=pair["labelValues"])
        nodes = logic.process(fixedNode, movingNode, options,
                              fixedSegmentationNode=pair["fixedSegmentationNode"],
                              movingSegmentationNode=pair["movingSegmentationNode"],
                              progressCallback=lambda stage, fraction: stages.append((stage, fraction)))

        transformNode = nodes["outputTransformNode"]
        self.assertTrue(transformNode.IsA("vtkMRMLTransformNode"))
        self.assertEqual(transformNode.GetTransformFromParent().GetClassName(), "vtkOrientedGridTransform")
        self.assertEqual(movingNode.GetTransformNodeID(), transformNode.GetID())
        self.assertEqual(stages[-1][1], 1.0)

        jacobianNode = nodes["jacobianVolumeNode"]
        self.assertEqual(jacobianNode.GetImageData().GetDimensions(), fixedNode.GetImageData().GetDimensions())
        a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        jacobianNode.GetIJKToRASMatrix(a)
        fixedNode.GetIJKToRASMatrix(b)
        np.testing.assert_allclose(_arrayFromVTKMatrix(a), _arrayFromVTKMatrix(b), atol=1e-6)

        table = nodes["statsTableNode"]
        measures = [table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())]
        for expected in ("SDlogJ", "Folding |J| <= 0 (%)", "Jacobian min", "Jacobian max", "Run time (s)", "Device",
                         "Dice", "HD95 (mm)"):
            self.assertIn(expected, measures)
        meanRow = [r for r in range(table.GetNumberOfRows())
                   if table.GetCellText(r, 0) == "Dice" and table.GetCellText(r, 1) == "mean"][0]
        diceAfter = float(table.GetCellText(meanRow, 2))
        diceBefore = float(table.GetCellText(meanRow, 3))
        self.assertGreater(diceAfter, diceBefore)
        self.delayDisplay(f"Test passed: mean Dice {diceBefore:.3f} -> {diceAfter:.3f}")
