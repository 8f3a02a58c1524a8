"""TextSCF Registration: 3D Slicer scripted module.

Deformable CT/MRI registration with spatially covariant filters driven by text prompts (textSCF). The module is a
thin front end: every computation happens in the engine, ``textscf.pipeline.register``, run in a process of its own
(``python -m textscf.worker``) so that a crash or an out-of-memory there never takes Slicer and its scene with it, and
Cancel ends it at any stage. This file holds the widget, the logic (the steps of a registration) and the self-test;
the MRML conversions, output nodes, table and engine process are in ``TextSCFRegistrationLib/`` beside it.

Conventions (see docs/ARCHITECTURE.md): the engine works in ITK LPS millimetres; Slicer in RAS, where
``(x, y, z)_RAS = (-x, -y, z)_LPS``. Displacements follow the resampling convention (a fixed point maps to a
moving point), which in Slicer is a transform stored as *TransformFromParent*.

The file runs unchanged in three places:

- in the Slicer application (Qt, ``slicer.app``, ``slicer.ScriptedLoadableModule`` available);
- with ``slicer-core`` (MRML and logic wheels, no Qt): only the logic and the self-test are usable, the GUI classes
  are replaced by small stand-ins so that ``TextSCFRegistrationLogic`` can be imported and used headless;
- in ctest through ``slicer_add_python_unittest``.
"""

import dataclasses
import enum
import json
import logging
import os
import sys
import unittest

import numpy as np
import vtk

import slicer
from slicer.util import VTKObservationMixin

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # the module loaded by path, outside Slicer
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from TextSCFRegistrationLib import conversions, engineprocess, presentation  # noqa: E402
from TextSCFRegistrationLib.outputnodes import OutputNodes  # noqa: E402
from TextSCFRegistrationLib.presentation import (  # noqa: E402,F401  (names scripts and tests use)
    JACOBIAN_DISPLAY_MAX,
    JACOBIAN_DISPLAY_MIN,
    JACOBIAN_HIGH_COLOR,
    JACOBIAN_LOW_COLOR,
)
from TextSCFRegistrationLib.scenechanges import SceneChanges, nodeIds, removeNewNodes  # noqa: E402

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
        # it; the iterations below are used only when it is off (their defaults are the bundled model's schedule:
        # textscf.schedule.CHECKPOINT_NETWORK_STEPS and CHECKPOINT_FIELD_STEPS).
        automaticSchedule: bool = True
        refineIterations: Annotated[int, WithinRange(0, 10000)] = 0
        refineLearningRate: Annotated[float, WithinRange(0.0, 1.0)] = 1e-3
        refineSmoothWeight: Annotated[float, WithinRange(0.0, 100.0)] = 0.1
        refineFieldIterations: Annotated[int, WithinRange(0, 10000)] = 100
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
        # The engine runs in a process of its own; while Apply waits for it the GUI stays alive through this.
        self.logic.pollCallback = slicer.app.processEvents

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
            # automatic: the schedule's λ for its similarity (textscf.schedule.smooth_weight_for)
            "refine_smooth_weight": None if p.automaticSchedule else float(p.refineSmoothWeight),
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
        self.ui.statusLabel.text = _("Stopping the registration...")

    def _runInWorkerThread(self, call):
        """Run ``call`` (a download, which touches no MRML node) on a worker thread and keep the GUI alive.

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
        worker = threading.Thread(target=target, name="TextSCF download", daemon=True)
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
    # Keep the engine process's job folder (inputs, outputs) after process() for inspection; removed by default.
    keepJobFolder = False

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self.cancelRequested = False
        self.lastResult = None
        self.lastNodes = None
        # What the last process() decided for the user (a labelmap remapped by name, ...): shown in the table.
        self.notes = []
        # Called every 50 ms while the engine process runs (the widget keeps the GUI alive with it).
        self.pollCallback = None
        # The running engine process's job (TextSCFRegistrationLib.engineprocess.EngineJob), the last one after.
        self.job = None

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

    # -- regions and MRML conversions (TextSCFRegistrationLib.conversions) -------------------------------------------

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
            if conversions.normalizedName(name) in {conversions.normalizedName(n) for n in names}:
                raise ValueError(_("Region '{0}' is listed twice.").format(name))
            if int(value) in values:
                raise ValueError(_("Label value {0} is used by two regions.").format(int(value)))
            names.append(name)
            values.append(int(value))
        if not names:
            raise ValueError(_("The region table is empty: add at least one region or choose a preset."))
        return names, values

    def labelImageFromNode(self, node, referenceVolumeNode, regionNames=None, labelValues=None):
        """``conversions.labelImageFromNode``; a labelmap remapped by name is noted in the results (``notes``)."""
        return conversions.labelImageFromNode(node, referenceVolumeNode, regionNames, labelValues, self.notes)

    regionsOfNode = staticmethod(conversions.regionsOfNode)
    colorNamesOfLabelmap = staticmethod(conversions.colorNamesOfLabelmap)
    volumeNodeGeometryLPS = staticmethod(conversions.volumeNodeGeometryLPS)
    volumeNodeToSitk = staticmethod(conversions.volumeNodeToSitk)
    updateVolumeNodeFromSitk = staticmethod(conversions.fillVolumeNode)
    transformNodeToSitk = staticmethod(conversions.transformNodeToSitk)
    setGridTransformFromDisplacement = staticmethod(conversions.setGridTransformFromDisplacement)
    sitkToSegmentationNode = staticmethod(conversions.fillSegmentationNode)

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
        nodeIdsBefore = nodeIds(scene)
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
            removeNewNodes(scene, nodeIdsBefore)
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

        wanted = sorted((conversions.normalizedName(n), int(v)) for n, v in zip(regionNames, labelValues))
        for name in list_presets():
            preset = load_preset(name)
            if sorted((conversions.normalizedName(n), int(v)) for n, v in zip(preset.region_names, preset.label_values)) == wanted:
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
        from textscf.presets import bundled_model_path

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

        plan = _ModelPlan(options, fixedVolumeNode, "cuda" if (
            (options or {}).get("device", "auto") != "cpu" and self.cudaAvailable()) else "cpu")
        checkpoint = plan.options.get("checkpoint")
        if str(checkpoint or "").lower() == "fresh":
            return plan.fresh()
        if torchAvailable is None:
            torchAvailable = importlib.util.find_spec("torch") is not None
        if not torchAvailable:
            return plan.result(_("The model is checked against the regions on Apply, once PyTorch is installed."))
        config = self.modelConfig(checkpoint)
        modelName = _("the bundled model") if not checkpoint else _("the chosen model")
        problems = plan.problems(config, modelName)
        if problems:
            return plan.switchToFresh(problems)
        return plan.withModel(config, modelName)

    # -- registration -------------------------------------------------------------------------------------------------

    def requestCancel(self):
        self.cancelRequested = True

    @staticmethod
    def _optionsDict(options):
        """The options as a dict of ``RegistrationOptions`` fields (the engine process checks them). A dict keeps
        the Slicer side free of torch: ``textscf.pipeline`` is imported in the engine process only."""
        import dataclasses

        if options is None:
            return {}
        if isinstance(options, dict):
            return dict(options)
        if dataclasses.is_dataclass(options):
            return dataclasses.asdict(options)
        raise TypeError("options must be a RegistrationOptions, a dict of its fields, or None")

    def process(self, fixedVolumeNode, movingVolumeNode, options=None, fixedSegmentationNode=None,
                movingSegmentationNode=None, initialTransformNode=None, outputTransformNode=None,
                outputVolumeNode=None, jacobianVolumeNode=None, statsTableNode=None,
                showDisplacementMagnitude=False, progressCallback=None, cancelCallback=None, showResult=True):
        """Register ``movingVolumeNode`` to ``fixedVolumeNode`` with the engine and put the results in the scene.

        The engine runs in a process of its own (``python -m textscf.worker``, see ``TextSCFRegistrationLib.
        engineprocess``): a crash or an out-of-memory there is reported as an error and never touches Slicer.

        :param options: ``textscf.pipeline.RegistrationOptions``, a dict of its fields, or None (defaults).
        :param fixedSegmentationNode: segmentation or labelmap giving the fixed regions. Without it, and with
            ``segmentor_weights`` in the options, both volumes are segmented automatically (SwinUNETR, settings in
            ``segmentorSettings``): the segmentations appear in the scene as segmentation nodes (returned as
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
        :param cancelCallback: ``f() -> bool``, polled every 50 ms while the engine runs and between the output
            nodes; True stops the engine process (terminate, then kill after a second) and raises CancelledError.
        :return: dict of the created or filled nodes: ``outputTransformNode``, ``outputVolumeNode``,
            ``jacobianVolumeNode``, ``statsTableNode``, ``displacementMagnitudeVolumeNode``, ``jacobianColorNode``.

        On failure or cancel the scene is left as it was: created nodes are removed, existing output nodes restored.
        """
        from textscf.errors import CancelledError

        self.cancelRequested, self.notes = False, []
        report = _progressReporter(progressCallback)
        isCancelled = lambda: bool(self.cancelRequested or (cancelCallback is not None and cancelCallback()))  # noqa
        scene = self._checkInputNodes(fixedVolumeNode, movingVolumeNode)
        report(_("Reading inputs"), 0.0)
        inputs = self._engineInputs(self._optionsDict(options), fixedVolumeNode, movingVolumeNode,
                                    fixedSegmentationNode, movingSegmentationNode, initialTransformNode)
        if isCancelled():
            raise CancelledError("registration cancelled before it started")
        with engineprocess.EngineJob(keepFolder=self.keepJobFolder) as job:
            self.job = job
            result = self._runEngine(job, inputs, fixedVolumeNode, movingVolumeNode, report, isCancelled)
            self._checkInputNodes(fixedVolumeNode, movingVolumeNode, scene)
            with SceneChanges(scene):  # the automatic segmentations too go if the outputs fail
                nodes = self._segmentationNodes(result, inputs, fixedVolumeNode, movingVolumeNode)
                nodes.update(self.createOutputNodes(
                    result, fixedVolumeNode, movingVolumeNode, outputTransformNode=outputTransformNode,
                    outputVolumeNode=outputVolumeNode, jacobianVolumeNode=jacobianVolumeNode,
                    statsTableNode=statsTableNode,
                    movingSegmentationNode=nodes.get("movingSegmentationNode", movingSegmentationNode),
                    showDisplacementMagnitude=showDisplacementMagnitude,
                    progressCallback=lambda stage, fraction: report(stage, 0.85 + 0.15 * fraction),
                    cancelCallback=isCancelled))
        self.lastNodes = nodes
        if showResult:
            self.showResults(nodes, fixedVolumeNode)
        report(_("Done"), 1.0)
        return nodes

    @staticmethod
    def _checkInputNodes(fixedVolumeNode, movingVolumeNode, scene=None):
        """The scene of the two volumes; InputError when they cannot be registered (or left ``scene``)."""
        from textscf.errors import InputError

        if fixedVolumeNode is None or movingVolumeNode is None:
            raise InputError("select both a fixed and a moving volume")
        if fixedVolumeNode is movingVolumeNode:
            raise InputError("the fixed and moving volumes must be different nodes")
        if scene is not None:
            for node in (fixedVolumeNode, movingVolumeNode):
                if node.GetScene() is not scene:
                    raise InputError(f"volume '{node.GetName()}' was removed from the scene during the registration")
            return scene
        scene = fixedVolumeNode.GetScene()
        if scene is None or movingVolumeNode.GetScene() is not scene:
            raise InputError("the fixed and moving volumes must be in the same scene")
        for node, role in ((fixedVolumeNode, "fixed"), (movingVolumeNode, "moving")):
            conversions.checkVolumeNode(node)
            parent = node.GetParentTransformNode()
            if parent is not None and parent.GetAttribute("TextSCF.Output") != "transform":
                logging.warning("TextSCF: the %s volume '%s' is under a transform; registration uses its voxels "
                                "without that transform (give it as the initial transform to use it)",
                                role, node.GetName())
        return scene

    def _engineInputs(self, options, fixedVolumeNode, movingVolumeNode, fixedSegmentationNode,
                      movingSegmentationNode, initialTransformNode):
        """What the engine process gets besides the two volumes: options, label maps, initial transform and the
        automatic segmentation settings. The regions are the options' (preset or list), else the segments'."""
        names, values = options.get("region_names"), options.get("label_values")
        if names is None and options.get("preset"):
            from textscf.presets import load_preset

            preset = load_preset(options["preset"])
            names, values = list(preset.region_names), list(preset.label_values)
        inputs = _EngineInputs(options=options)
        if fixedSegmentationNode is not None:
            inputs.fixedLabels, names, values = self.labelImageFromNode(fixedSegmentationNode, fixedVolumeNode,
                                                                        names, values)
        if movingSegmentationNode is not None:
            inputs.movingLabels, names, values = self.labelImageFromNode(movingSegmentationNode, movingVolumeNode,
                                                                         names, values)
        if fixedSegmentationNode is None and options.get("segmentor_weights"):
            if names is None:
                from textscf.segmentation import btcv_bundle_region_names

                names = btcv_bundle_region_names()
                values = list(range(1, len(names) + 1))
            inputs.segment = {"images": ["fixed"] + ([] if movingSegmentationNode is not None else ["moving"]),
                              "settings": dict(self.segmentorSettings), "region_names": list(names),
                              "label_values": [int(v) for v in values]}
        if options.get("region_names") is None and not options.get("preset") and names is not None:
            options.update(region_names=list(names), label_values=[int(v) for v in values])
        if initialTransformNode is not None:
            inputs.initialTransform = self.transformNodeToSitk(initialTransformNode, fixedVolumeNode)
        return inputs

    def _runEngine(self, job, inputs, fixedVolumeNode, movingVolumeNode, report, isCancelled):
        """Write the job and run the engine process; returns its ``EngineResult`` with the notes in its stats."""
        job.addVolume("fixed", fixedVolumeNode)
        job.addVolume("moving", movingVolumeNode)
        job.addLabelImage("fixed_labels", inputs.fixedLabels)
        job.addLabelImage("moving_labels", inputs.movingLabels)
        job.addTransform(inputs.initialTransform)
        result = job.run(inputs.options, inputs.segment,
                         progress=lambda stage, fraction, secondsLeft: report(stage, 0.02 + 0.83 * fraction,
                                                                              secondsLeft),
                         cancel=isCancelled, poll=self.pollCallback, log=self._log)
        if self.notes:
            result.stats.setdefault("notes", []).extend(self.notes)
        self.lastResult = result
        return result

    def _segmentationNodes(self, result, inputs, fixedVolumeNode, movingVolumeNode):
        """New segmentation nodes for the automatic segmentations the engine made (none without)."""
        nodes = {}
        for role, volumeNode in (("fixed", fixedVolumeNode), ("moving", movingVolumeNode)):
            if role in result.segmentations:
                nodes[f"{role}SegmentationNode"] = self._segmentationNodeFor(
                    result.segmentations[role], volumeNode, inputs.segment["region_names"],
                    inputs.segment["label_values"])
        return nodes

    def _log(self, line):
        """The engine's lines for the user (the schedule it runs): the log, and the notes of the result."""
        logging.info("TextSCF: %s", line)
        self.notes.append(line)

    # Keyword arguments for the SwinUNETR segmentor beyond weights and feature size (roi_size, target_spacing,
    # overlap, ...); empty = MONAI's BTCV settings.
    segmentorSettings = {}

    def _segmentationNodeFor(self, labelImage, volumeNode, regionNames, labelValues):
        """A new segmentation node in the scene holding an automatic segmentation of ``volumeNode``."""
        scene = volumeNode.GetScene()
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                       scene.GenerateUniqueName(f"{volumeNode.GetName()} TextSCF segmentation"))
        node.CreateDefaultDisplayNodes()
        conversions.fillSegmentationNode(labelImage, node, regionNames, labelValues, volumeNode)
        node.SetAttribute("TextSCF.Output", "automatic segmentation")
        return node

    def createOutputNodes(self, result, fixedVolumeNode, movingVolumeNode, outputTransformNode=None,
                          outputVolumeNode=None, jacobianVolumeNode=None, statsTableNode=None,
                          movingSegmentationNode=None, showDisplacementMagnitude=False, progressCallback=None,
                          cancelCallback=None):
        """Put a registration result (``RegistrationResult`` or the engine process's ``EngineResult``) into the
        scene (see ``process``); all or nothing.

        ``cancelCallback`` is polled between the nodes: cancelling or any error removes the nodes created here,
        restores the content of the given output nodes and the parent transforms that were changed.
        """
        from textscf.errors import CancelledError

        def step(stage, fraction):
            if cancelCallback is not None and cancelCallback():
                raise CancelledError("registration cancelled while creating the output nodes")
            if progressCallback is not None:
                progressCallback(stage, fraction)

        with SceneChanges(fixedVolumeNode.GetScene()) as changes:
            outputs = OutputNodes(changes, fixedVolumeNode, movingVolumeNode)
            step(_("Creating the output transform"), 0.0)
            transformNode = outputs.transform(result.displacement, outputTransformNode)
            step(_("Creating the warped volume"), 0.2)
            warpedNode = None
            if outputVolumeNode is not None:
                warpedNode = outputs.volume(result.warped, outputVolumeNode, "warped", "warped")
            step(_("Creating the Jacobian map"), 0.4)
            jacobianNode, colorNode = outputs.jacobian(result.jacobian, jacobianVolumeNode)
            step(_("Creating the displacement magnitude"), 0.6)
            magnitudeNode = outputs.displacementMagnitude(transformNode) if showDisplacementMagnitude else None
            step(_("Filling the table"), 0.8)
            tableNode = outputs.table(result.stats, result.region_names, statsTableNode)
            step(_("Placing the moving volume under the transform"), 0.9)
            if outputVolumeNode is None:
                outputs.placeUnderTransform((movingVolumeNode, movingSegmentationNode), transformNode)
            step(_("Outputs ready"), 1.0)
        self.lastNodes = {"outputTransformNode": transformNode, "outputVolumeNode": warpedNode,
                          "jacobianVolumeNode": jacobianNode, "jacobianColorNode": colorNode,
                          "displacementMagnitudeVolumeNode": magnitudeNode, "statsTableNode": tableNode}
        return dict(self.lastNodes)

    # -- presentation (TextSCFRegistrationLib.presentation) -----------------------------------------------------------

    jacobianColors = staticmethod(presentation.jacobianColors)
    setupJacobianDisplay = staticmethod(presentation.setupJacobianDisplay)
    statsRows = staticmethod(presentation.statsRows)

    def jacobianColorNode(self, scene=None):
        return presentation.jacobianColorNode(scene or self.scene)

    def fillStatsTable(self, tableNode, stats, regionNames=()):
        return presentation.fillStatsTable(tableNode, stats, regionNames)

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


@dataclasses.dataclass
class _EngineInputs:
    """What the engine process gets besides the two volumes (see ``TextSCFRegistrationLogic._engineInputs``)."""

    options: dict = None
    fixedLabels: object = None
    movingLabels: object = None
    initialTransform: object = None
    segment: dict = None


class _ModelPlan:
    """The pieces of ``TextSCFRegistrationLogic.modelPlan``: the options, the device, the fixed volume's size."""

    def __init__(self, options, fixedVolumeNode, device):
        from textscf.presets import load_preset

        self.options = dict(options or {})
        self.device = device
        self.deviceLabel = _("the GPU") if device == "cuda" else _("the CPU")
        self.preset = load_preset(self.options["preset"]) if self.options.get("preset") else None
        self.names = self.options.get("region_names") or (list(self.preset.region_names) if self.preset else None)
        imageData = fixedVolumeNode.GetImageData() if fixedVolumeNode is not None else None
        self.fixedSize = imageData.GetDimensions() if imageData is not None else None
        self.estimatedSeconds = None

    def result(self, message="", switched=False):
        return {"switched": switched, "options": self.options, "message": message,
                "estimatedSeconds": self.estimatedSeconds}

    def steps(self):
        """(network, field) steps of the options: None = the default schedule (automatic); absent =
        RegistrationOptions' default, no refinement."""
        return self.options.get("refine_iterations", 0), self.options.get("refine_field_iterations", 0)

    def schedule(self, network, grid, spacing=None):
        """The engine's schedule for this network and grid (spacing in mm: a coarse trained grid is subdivided for
        the field steps), with the steps of the options when they are set."""
        from textscf import schedule as plans

        return plans.with_steps(plans.default_schedule(network, grid, self.device, grid_spacing=spacing),
                                *self.steps())

    def describeFresh(self, prefix):
        from textscf import schedule as plans

        factor = self.options.get("fresh_grid_factor")
        grid = None if self.fixedSize is None else (
            plans.fresh_grid_for(self.fixedSize, self.device) if factor is None
            else plans.fresh_grid_shape(self.fixedSize, float(factor)))
        chosen = self.schedule("fresh", grid or (16, 16, 16))
        text = prefix + _("a fresh network refined on this pair: {0} + {1} iterations").format(
            chosen.network_steps, chosen.field_steps)
        if grid is not None:
            self.estimatedSeconds = chosen.estimated_seconds
            text += _(", {0} on {1}").format(plans.describe_duration(chosen.estimated_seconds), self.deviceLabel)
        return text + "."

    def fresh(self):
        """The plan when a fresh network is asked for by name."""
        network = self.steps()[0]
        if network is None or int(network) > 0:
            return self.result(self.describeFresh(_("Model: ")))
        return self.result(_("A fresh network must be refined on the pair: set 'Refine on this pair' above 0."))

    def problems(self, config, modelName):
        """Why the model cannot register these regions (unknown regions of a one-hot model, another modality)."""
        from textscf.presets import model_rows

        problems = []
        if config.get("text_encoder", "onehot") == "onehot" and self.names is not None:
            _rows, unknown = model_rows(config.get("region_names", []), self.names)
            if unknown:
                shown = ", ".join(unknown[:4]) + (_(" and {0} more").format(len(unknown) - 4) if len(unknown) > 4
                                                  else "")
                problems.append(_("{0} knows only its {1} training regions (one-hot prompts), not {2}").format(
                    modelName, len(config.get("region_names", [])), shown))
        if self.preset is not None and config.get("modality") and self.preset.modality != config["modality"]:
            problems.append(_("{0} was trained on {1}, not {2}").format(
                modelName, config["modality"].upper(), self.preset.modality.upper()))
        return problems

    def withModel(self, config, modelName):
        """The plan with the chosen model: its refinement schedule and expected time, when it refines."""
        from textscf import schedule as plans

        if not config.get("input_shape"):
            return self.result()
        chosen = self.schedule("checkpoint", config["input_shape"], config.get("spacing"))
        if chosen.steps <= 0:
            return self.result()
        self.estimatedSeconds = chosen.estimated_seconds
        return self.result(_("Model: {0}, refined on this pair ({1} + {2} iterations, {3} on {4}).").format(
            modelName, chosen.network_steps, chosen.field_steps, plans.describe_duration(chosen.estimated_seconds),
            self.deviceLabel))

    def switchToFresh(self, problems):
        """The plan that replaces the model by a fresh network refined on the pair (at least the fresh schedule)."""
        from textscf import schedule as plans

        requested, requestedField = self.steps()
        self.options.update(checkpoint="fresh",
                            refine_iterations=max(int(requested or 0), plans.FRESH_NETWORK_STEPS),
                            refine_field_iterations=max(int(requestedField or 0), plans.FRESH_FIELD_STEPS))
        text = "; ".join(problems)
        return self.result(self.describeFresh(text[:1].upper() + text[1:] + _(". Apply will use ")), switched=True)


def _progressReporter(progressCallback):
    """``report(stage, fraction, secondsLeft=None)``: clamps the fraction and calls ``progressCallback`` with the
    seconds left when it takes them (``textscf.schedule.takes_seconds_left``, torch-free)."""
    withSeconds = False
    if progressCallback is not None:
        from textscf.schedule import takes_seconds_left

        withSeconds = takes_seconds_left(progressCallback)

    def report(stage, fraction, secondsLeft=None):
        logging.debug("TextSCF: %s (%.0f%%)", stage, 100 * fraction)
        if progressCallback is None:
            return
        fraction = float(min(1.0, max(0.0, fraction)))
        if withSeconds:
            progressCallback(stage, fraction, secondsLeft)
        else:
            progressCallback(stage, fraction)

    return report


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
            names = [n for n in names if conversions.normalizedName(n) != "background"]
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
        np.testing.assert_allclose(conversions.arrayFromVTKMatrix(a), conversions.arrayFromVTKMatrix(b), atol=1e-6)

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
