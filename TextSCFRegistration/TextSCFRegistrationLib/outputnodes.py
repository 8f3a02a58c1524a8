"""The output nodes of a registration, each made or filled through a ``SceneChanges`` (so that all can be undone)."""

import numpy as np
import vtk
from vtk.util import numpy_support as vtk_np

from . import conversions, presentation

FIXED_VOLUME_REFERENCE_ROLE = "fixedVolume"
MOVING_VOLUME_REFERENCE_ROLE = "movingVolume"


class OutputNodes:
    """Makes the output nodes of a registration of ``movingVolumeNode`` to ``fixedVolumeNode``.

    Outputs lie on the fixed grid and under the fixed volume's parent transform; given nodes are filled in place,
    missing ones created with names derived from the two volumes.
    """

    def __init__(self, changes, fixedVolumeNode, movingVolumeNode):
        self.changes = changes
        self.scene = changes.scene
        self.fixedVolumeNode = fixedVolumeNode
        self.movingVolumeNode = movingVolumeNode
        self.parentId = fixedVolumeNode.GetTransformNodeID()
        self.baseName = f"{movingVolumeNode.GetName()} to {fixedVolumeNode.GetName()}"

    def transform(self, displacement, node=None):
        """The grid transform (TransformFromParent) of the displacement, referencing both volumes."""
        node = self.changes.node(node, "vtkMRMLGridTransformNode", f"{self.baseName} (TextSCF)")
        conversions.setGridTransformFromDisplacement(node, displacement)
        self.changes.setReference(node, FIXED_VOLUME_REFERENCE_ROLE, self.fixedVolumeNode.GetID())
        self.changes.setReference(node, MOVING_VOLUME_REFERENCE_ROLE, self.movingVolumeNode.GetID())
        self._placeOutput(node, "transform")  # it maps fixed-volume coordinates: same parent as the fixed volume
        return node

    def volume(self, image, node, suffix, kind):
        """A scalar volume on the fixed grid holding ``image``."""
        node = self.changes.node(node, "vtkMRMLScalarVolumeNode", f"{self.baseName} {suffix}")
        conversions.fillOnFixedGrid(node, image, self.fixedVolumeNode)
        self._placeOutput(node, kind)
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        return node

    def jacobian(self, image, node=None):
        """The Jacobian determinant with the diverging colour table; returns (volume node, colour node)."""
        node = self.volume(image, node, "Jacobian", "jacobian")
        colorNode = presentation.jacobianColorNode(self.scene)
        presentation.setupJacobianDisplay(node, colorNode)
        return node, colorNode

    def displacementMagnitude(self, transformNode):
        """A new volume of |displacement| (mm), computed into its own buffer from the grid transform's."""
        grid = transformNode.GetTransformFromParent().GetDisplacementGrid()
        dims = grid.GetDimensions()
        vectors = vtk_np.vtk_to_numpy(grid.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0], 3)
        imageData = vtk.vtkImageData()
        imageData.SetDimensions(*dims)
        imageData.AllocateScalars(vtk.VTK_FLOAT, 1)
        magnitude = vtk_np.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
        np.einsum("...i,...i->...", vectors, vectors, out=magnitude, casting="same_kind")
        np.sqrt(magnitude, out=magnitude)
        node = self.changes.node(None, "vtkMRMLScalarVolumeNode", f"{self.baseName} displacement (mm)")
        node.SetAndObserveImageData(imageData)
        node.CopyOrientation(self.fixedVolumeNode)
        self._placeOutput(node, "displacement magnitude")
        node.CreateDefaultDisplayNodes()
        return node

    def table(self, stats, regionNames, node=None):
        node = self.changes.node(node, "vtkMRMLTableNode", f"{self.baseName} TextSCF statistics")
        presentation.fillStatsTable(node, stats, regionNames)
        self.changes.markOutput(node, "statistics")
        return node

    def placeUnderTransform(self, nodes, transformNode):
        for node in nodes:
            if node is not None:
                self.changes.setParent(node, transformNode.GetID())

    def _placeOutput(self, node, kind):
        self.changes.markOutput(node, kind)
        self.changes.setParent(node, self.parentId)
