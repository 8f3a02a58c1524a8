"""MRML nodes <-> images: volume nodes, grid transforms, segmentations and label maps.

Images are SimpleITK images (LPS geometry) or raw NRRD files (``nrrd.NrrdFile``, the engine process's outputs); both
are read through the same small interface (``size``, ``components``, ``dtype``, ``shape``, ``origin``, ``spacing``,
``direction``, ``readInto``), straight into the buffer of the node that holds the voxels.
Conventions (docs/ARCHITECTURE.md): LPS millimetres in images, RAS in Slicer; numpy views of VTK images are
``[k, j, i]``.
"""

import logging

import numpy as np
import vtk
from vtk.util import numpy_support as vtk_np

import slicer

from . import nrrd

# RAS <-> LPS: flip the first two axes (the matrix is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
LPS_TO_RAS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])

SEGMENT_COLORS = (
    (0.90, 0.35, 0.30), (0.30, 0.65, 0.90), (0.95, 0.80, 0.25), (0.45, 0.80, 0.40), (0.75, 0.45, 0.85),
    (0.95, 0.55, 0.20), (0.35, 0.85, 0.80), (0.85, 0.40, 0.60), (0.60, 0.60, 0.30), (0.40, 0.45, 0.85),
    (0.85, 0.70, 0.55), (0.55, 0.85, 0.60), (0.70, 0.30, 0.30),
)


# -- names ------------------------------------------------------------------------------------------------------------

def normalizedName(name):
    """A region name compared loosely, other tools' names resolved ("kidney_right" and "Right Kidney" are equal)."""
    from textscf.presets import canonical_region_name, normalized_name

    return normalized_name(canonical_region_name(name))


def canonicalName(name):
    """The preset's name of a region named by another tool (TotalSegmentator's "kidney_right" -> "right kidney")."""
    from textscf.presets import canonical_region_name

    return canonical_region_name(name)


# -- matrices and geometry --------------------------------------------------------------------------------------------

def arrayFromVTKMatrix(matrix):
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def vtkMatrix3(array):
    """A vtkMatrix4x4 whose upper 3x3 block is ``array``."""
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def volumeNodeGeometryLPS(volumeNode):
    """(origin, spacing, direction 3x3) of a volume node in ITK's LPS convention."""
    directions = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASDirectionMatrix(directions)
    directionRAS = arrayFromVTKMatrix(directions)[:3, :3]
    originLPS = LPS_TO_RAS @ np.array(volumeNode.GetOrigin(), float)
    return originLPS, np.array(volumeNode.GetSpacing(), float), LPS_TO_RAS @ directionRAS


def setVolumeNodeGeometryLPS(volumeNode, origin, spacing, direction):
    volumeNode.SetIJKToRASDirectionMatrix(vtkMatrix3(LPS_TO_RAS @ np.asarray(direction, float).reshape(3, 3)))
    volumeNode.SetOrigin(*(LPS_TO_RAS @ np.asarray(origin, float)))
    volumeNode.SetSpacing(*[float(s) for s in spacing])


def setImageGeometryFromNode(image, volumeNode):
    origin, spacing, direction = volumeNodeGeometryLPS(volumeNode)
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in direction.ravel()])
    return image


# -- images: SimpleITK or raw NRRD, read into node buffers ------------------------------------------------------------

class SitkImageSource:
    """A SimpleITK image seen through the ``nrrd.NrrdFile`` interface (64-bit integers become 32-bit)."""

    def __init__(self, image):
        import SimpleITK as sitk

        self.image = image
        self._view = sitk.GetArrayViewFromImage(image)
        dtype = self._view.dtype
        self.dtype = {np.dtype(np.int64): np.dtype(np.int32), np.dtype(np.uint64): np.dtype(np.uint32)}.get(dtype,
                                                                                                           dtype)
        self.size = tuple(int(s) for s in image.GetSize())
        self.components = image.GetNumberOfComponentsPerPixel()
        self.shape = self._view.shape
        self.origin = np.array(image.GetOrigin())
        self.spacing = np.array(image.GetSpacing())
        self.direction = np.array(image.GetDirection()).reshape(3, 3)

    def readInto(self, out):
        np.copyto(out, self._view, casting="unsafe")


def imageSource(image):
    """The image as a source of voxels: a SimpleITK image, a ``nrrd.NrrdFile`` or a path of a raw NRRD file."""
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        return nrrd.read_header(image)
    if isinstance(image, nrrd.NrrdFile):
        return image
    return SitkImageSource(image)


def _allocatedImageData(source):
    """A new vtkImageData of the source's size and type, and the numpy view ``source.shape`` of its scalars."""
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(*[int(s) for s in source.size])
    imageData.AllocateScalars(vtk_np.get_vtk_array_type(source.dtype), int(source.components))
    return imageData, vtk_np.vtk_to_numpy(imageData.GetPointData().GetScalars()).reshape(source.shape)


def fillVolumeNode(volumeNode, image):
    """Fill a scalar or labelmap volume node with an image (voxels and geometry), reading into the node's buffer."""
    source = imageSource(image)
    if source.components != 1:
        raise ValueError("only scalar images can fill a scalar volume node")
    imageData, voxels = _allocatedImageData(source)
    source.readInto(voxels)
    volumeNode.SetAndObserveImageData(imageData)
    setVolumeNodeGeometryLPS(volumeNode, source.origin, source.spacing, source.direction)
    volumeNode.StorableModified()
    return volumeNode


def fillOnFixedGrid(volumeNode, image, fixedVolumeNode):
    """Fill a volume with an image on the fixed grid, taking the geometry exactly from the fixed volume."""
    fillVolumeNode(volumeNode, image)
    size = volumeNode.GetImageData().GetDimensions()
    if size == fixedVolumeNode.GetImageData().GetDimensions():
        fixedOrigin = volumeNodeGeometryLPS(fixedVolumeNode)[0]
        origin = volumeNodeGeometryLPS(volumeNode)[0]
        if np.allclose(fixedOrigin, origin, atol=1e-3 * max(volumeNode.GetSpacing())):
            volumeNode.CopyOrientation(fixedVolumeNode)


def checkVolumeNode(volumeNode, checkFinite=True):
    """InputError for a volume the engine cannot use (none, no voxels, empty, vectors, no finite value)."""
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
    if checkFinite:
        voxels = slicer.util.arrayFromVolume(volumeNode)
        if np.issubdtype(voxels.dtype, np.floating) and not _anyFinite(voxels):
            raise InputError(f"volume '{name}' contains no finite value (all NaN or infinite)")


def _anyFinite(voxels):
    """Whether any voxel is finite, one slice at a time (no full-size temporary)."""
    return any(np.isfinite(plane).any() for plane in voxels)


def volumeNodeToSitk(volumeNode, checkFinite=True, withVoxels=True):
    """A scalar or labelmap volume node as a SimpleITK image (LPS geometry; a copy of the voxels). InputError for
    unusable volumes. The parent transform of the node, if any, is not applied (as when saving the volume)."""
    import SimpleITK as sitk

    checkVolumeNode(volumeNode, checkFinite and withVoxels)
    if withVoxels:
        array = slicer.util.arrayFromVolume(volumeNode)
        image = sitk.GetImageFromArray(array.astype(np.int32) if array.dtype == np.int64 else array)
    else:
        image = sitk.Image([int(d) for d in volumeNode.GetImageData().GetDimensions()], sitk.sitkUInt8)
    return setImageGeometryFromNode(image, volumeNode)


def writeVolumeNode(volumeNode, path):
    """Write a volume node's voxels as a raw NRRD file (LPS), straight from its buffer."""
    voxels = slicer.util.arrayFromVolume(volumeNode)
    if voxels.dtype == np.int64:
        voxels = voxels.astype(np.int32)
    nrrd.write(path, np.ascontiguousarray(voxels), *volumeNodeGeometryLPS(volumeNode))


def writeLabelImage(image, path):
    """Write a SimpleITK label map as a raw NRRD file."""
    import SimpleITK as sitk

    nrrd.write(path, np.ascontiguousarray(sitk.GetArrayViewFromImage(image)), image.GetOrigin(), image.GetSpacing(),
               np.array(image.GetDirection()).reshape(3, 3))


# -- transforms -------------------------------------------------------------------------------------------------------

def gridPointsRAS(volumeNode):
    """RAS coordinates of every voxel centre, shape ``(K, J, I, 3)``."""
    dims = volumeNode.GetImageData().GetDimensions()
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    matrix = arrayFromVTKMatrix(ijkToRas)
    k, j, i = np.meshgrid(np.arange(dims[2]), np.arange(dims[1]), np.arange(dims[0]), indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(float)
    return ijk @ matrix[:3, :3].T + matrix[:3, 3]


def transformNodeToSitk(transformNode, referenceVolumeNode):
    """A transform node as the engine's initial transform (resampling convention, LPS).

    The node is read as Slicer users set it: placing the moving volume under it aligns it to the fixed volume. Its
    *from world* transform therefore maps fixed points to moving points. Linear transforms become an
    ``AffineTransform``; others are sampled on the reference (fixed) grid into a displacement field.
    """
    import SimpleITK as sitk

    if transformNode.IsTransformToWorldLinear():
        matrix = vtk.vtkMatrix4x4()
        transformNode.GetMatrixTransformFromWorld(matrix)
        lps = LPS_TO_RAS_4 @ arrayFromVTKMatrix(matrix) @ LPS_TO_RAS_4
        affine = sitk.AffineTransform(3)
        affine.SetMatrix([float(v) for v in lps[:3, :3].ravel()])
        affine.SetTranslation([float(v) for v in lps[:3, 3]])
        return affine
    fromWorld = vtk.vtkGeneralTransform()
    transformNode.GetTransformFromWorld(fromWorld)
    pointsRAS = gridPointsRAS(referenceVolumeNode)
    source = vtk.vtkPoints()
    source.SetData(vtk_np.numpy_to_vtk(pointsRAS.reshape(-1, 3), deep=True, array_type=vtk.VTK_DOUBLE))
    target = vtk.vtkPoints()
    target.SetDataTypeToDouble()
    fromWorld.TransformPoints(source, target)
    mappedRAS = vtk_np.vtk_to_numpy(target.GetData()).reshape(pointsRAS.shape)
    displacementLPS = (mappedRAS - pointsRAS) @ LPS_TO_RAS.T
    field = sitk.GetImageFromArray(displacementLPS.astype(np.float64), isVector=True)
    field.CopyInformation(volumeNodeToSitk(referenceVolumeNode, checkFinite=False, withVoxels=False))
    return sitk.DisplacementFieldTransform(field)


def setGridTransformFromDisplacement(transformNode, displacement):
    """Store an LPS displacement field (resampling convention) in a transform node, with no copy beyond the grid.

    ``displacement``: a SimpleITK vector image or a raw NRRD file of 3-vectors (any float type, kept as it is). The
    node gets a ``vtkOrientedGridTransform`` as *TransformFromParent* whose grid has the field's geometry in RAS and
    whose vectors are the displacements in RAS millimetres: the voxels are read once, into the grid's own buffer
    (``[k, j, i, 3]`` is VTK's layout), and the L and P components are negated there, in place.
    """
    source = imageSource(displacement)
    if source.components != 3 or len(source.size) != 3:
        raise ValueError("the displacement must be a 3D image of 3-vectors")
    grid, vectors = _allocatedImageData(source)
    source.readInto(vectors)
    vectors[..., :2] *= -1  # LPS -> RAS, in place
    grid.GetPointData().GetScalars().SetName("DisplacementRAS")
    grid.SetSpacing(*[float(s) for s in source.spacing])
    grid.SetOrigin(*(LPS_TO_RAS @ np.asarray(source.origin, float)))
    gridTransform = slicer.vtkOrientedGridTransform()
    gridTransform.SetDisplacementGridData(grid)
    gridTransform.SetGridDirectionMatrix(vtkMatrix3(LPS_TO_RAS @ np.asarray(source.direction, float)))
    gridTransform.SetInterpolationModeToLinear()
    transformNode.SetAndObserveTransformFromParent(gridTransform)


# -- segmentations and label maps -------------------------------------------------------------------------------------

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


def regionsOfNode(node):
    """Region names and label values a segmentation or labelmap node carries by itself.

    Segmentation: segment names, values 1..N in segment order. Labelmap: the values present, named from the node's
    colour table when it has names there, otherwise "label <value>". Names other tools give a preset's regions become
    that region's name (TotalSegmentator's "kidney_right" -> "right kidney").
    """
    if node.IsA("vtkMRMLSegmentationNode"):
        segmentation = node.GetSegmentation()
        names = [canonicalName(segmentation.GetNthSegment(i).GetName())
                 for i in range(segmentation.GetNumberOfSegments())]
        return names, list(range(1, len(names) + 1))
    values = [int(v) for v in np.unique(slicer.util.arrayFromVolume(node)) if v != 0]
    colorNames = colorNamesOfLabelmap(node, values)
    return [canonicalName(colorNames[v]) if v in colorNames else f"label {v}" for v in values], values


def segmentsToLabelArray(segmentationNode, segmentsAndValues, referenceVolumeNode):
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


def _segmentValues(node, regionNames, labelValues):
    """(region names, label values, {segment ID: value}) of a segmentation node, matched by name to the regions."""
    from textscf.errors import InputError

    segmentation = node.GetSegmentation()
    segmentIds = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if not segmentIds:
        raise InputError(f"segmentation '{node.GetName()}' has no segments")
    segmentNames = [segmentation.GetSegment(s).GetName() for s in segmentIds]
    if regionNames is None:
        values = list(range(1, len(segmentIds) + 1))
        return segmentNames, values, dict(zip(segmentIds, values))
    valueByName = {normalizedName(n): v for n, v in zip(regionNames, labelValues)}
    valueOfSegment = {s: valueByName[normalizedName(n)] for s, n in zip(segmentIds, segmentNames)
                      if normalizedName(n) in valueByName}
    unmatched = [n for n in segmentNames if normalizedName(n) not in valueByName]
    if not valueOfSegment:
        raise InputError(f"none of the segments of '{node.GetName()}' ({', '.join(segmentNames)}) matches a region "
                         f"({', '.join(regionNames)}): rename the segments or edit the region table")
    if unmatched:
        logging.warning("TextSCF: segments of '%s' without a matching region are ignored: %s", node.GetName(),
                        ", ".join(unmatched))
    return regionNames, labelValues, valueOfSegment


def labelImageFromNode(node, referenceVolumeNode, regionNames=None, labelValues=None, notes=None):
    """A segmentation or labelmap node as a label map (SimpleITK, int32) on the reference volume's grid.

    Returns ``(image, regionNames, labelValues)``. With ``regionNames``, segments are matched to regions by name
    (case, spaces, '_' and '-' ignored) and drawn with the region's label value (``labelValues``, default 1..N);
    unmatched segments are left out. Without, the node's own regions are used (``regionsOfNode``). Labelmap values are
    kept as they are, unless they are another tool's (names in the labelmap's colour table, or values that fit another
    bundled labelling scheme such as TotalSegmentator's): then they are mapped onto the regions by name, and the
    change is appended to ``notes``. The labelmap is resampled (nearest neighbour) if its grid differs.
    """
    import SimpleITK as sitk

    from textscf.errors import InputError

    if regionNames is not None:
        regionNames = list(regionNames)
        labelValues = list(labelValues) if labelValues is not None else list(range(1, len(regionNames) + 1))
        if len(labelValues) != len(regionNames):
            raise InputError(f"{len(regionNames)} region names but {len(labelValues)} label values")
    if node.IsA("vtkMRMLSegmentationNode"):
        regionNames, labelValues, valueOfSegment = _segmentValues(node, regionNames, labelValues)
        array = segmentsToLabelArray(node, list(valueOfSegment.items()), referenceVolumeNode)
        return setImageGeometryFromNode(sitk.GetImageFromArray(array), referenceVolumeNode), \
            list(regionNames), list(labelValues)
    if not node.IsA("vtkMRMLLabelMapVolumeNode") and not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"'{node.GetName()}' is neither a segmentation nor a labelmap volume")
    image = volumeNodeToSitk(node, checkFinite=False)
    reference = volumeNodeToSitk(referenceVolumeNode, checkFinite=False, withVoxels=False)
    from textscf.spatial import same_grid  # the engine's one grid tolerance (docs/ARCHITECTURE.md)

    if not same_grid(image, reference):
        image = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, image.GetPixelID())
    image = sitk.Cast(image, sitk.sitkInt32)
    if regionNames is None:
        regionNames, labelValues = regionsOfNode(node)
    else:
        image = _relabelByColorNames(node, image, regionNames, labelValues)
        image = _relabelByDetectedScheme(node, image, regionNames, labelValues, notes)
    return image, list(regionNames), list(labelValues)


def _relabelled(image, mapping):
    """The label map with each value in ``mapping`` replaced by its target and every other value 0."""
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(image)
    lookup = np.zeros(max(int(array.max()), max(mapping)) + 1, np.int32)
    for source, target in mapping.items():
        lookup[source] = target
    relabelled = sitk.GetImageFromArray(lookup[np.clip(array, 0, None)])
    relabelled.CopyInformation(image)
    return relabelled


def _relabelByDetectedScheme(node, image, regionNames, labelValues, notes=None):
    """Map a labelmap whose values follow another bundled labelling scheme onto the regions by name.

    A TotalSegmentator labelmap without names, read with the BTCV preset, would make its liver (5) the "esophagus":
    the engine's check (``textscf.segmentation.label_scheme_check``) finds the scheme the values fit instead, each of
    that scheme's regions gets the chosen region's value and the rest is background. The change is noted. When no
    bundled scheme fits, the values are kept and the engine refuses them with its message.
    """
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
    note = (f"labelmap '{node.GetName()}' has the label values of the '{scheme.name}' preset ({scheme.title}), "
            f"not those of the chosen regions ({'; '.join(problems)}); its regions were mapped by name")
    logging.warning("TextSCF: %s", note)
    if notes is not None:
        notes.append(note)
    return _relabelled(image, mapping)


def _relabelByColorNames(node, image, regionNames, labelValues):
    """Map a labelmap's values onto the regions' label values by the names in its colour table.

    A labelmap written by another tool (TotalSegmentator: 5 = liver) carries its own values; when its colour table
    names at least two of the regions, each value named as a region gets that region's value and every other value
    becomes background. Without such names the values are kept (the engine then checks that they fit).
    """
    import SimpleITK as sitk

    present = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(image)) if v != 0]
    valueOfRegion = {normalizedName(n): int(v) for n, v in zip(regionNames, labelValues)}
    mapping = {value: valueOfRegion[normalizedName(name)]
               for value, name in colorNamesOfLabelmap(node, present).items()
               if normalizedName(name) in valueOfRegion}
    if len(mapping) < 2 or all(source == target for source, target in mapping.items()):
        return image
    dropped = sorted(set(present) - set(mapping))
    if dropped:
        logging.info("TextSCF: labelmap '%s' relabelled by its colour names; %d label value(s) without a region "
                     "are background", node.GetName(), len(dropped))
    return _relabelled(image, mapping)


def fillSegmentationNode(labelImage, segmentationNode, regionNames, labelValues, referenceVolumeNode=None):
    """Fill a segmentation node with one segment per region present in a label map (SimpleITK image or raw NRRD
    file); segment names are the region names."""
    source = imageSource(labelImage)
    labels = np.empty(source.shape, source.dtype)
    source.readInto(labels)
    scaled = LPS_TO_RAS @ np.asarray(source.direction, float) @ np.diag(source.spacing)
    ijkToRas = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            ijkToRas.SetElement(r, c, scaled[r, c])
        ijkToRas.SetElement(r, 3, (LPS_TO_RAS @ np.asarray(source.origin, float))[r])
    segmentationNode.GetSegmentation().RemoveAllSegments()
    if referenceVolumeNode is not None:
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
    for index, (name, value) in enumerate(zip(regionNames, labelValues)):
        layer = slicer.vtkOrientedImageData()
        layer.SetDimensions(*[int(s) for s in source.size])
        layer.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        mask = vtk_np.vtk_to_numpy(layer.GetPointData().GetScalars()).reshape(labels.shape)
        np.equal(labels, value, out=mask, casting="unsafe")
        if not mask.any():
            continue
        layer.SetImageToWorldMatrix(ijkToRas)
        segmentationNode.AddSegmentFromBinaryLabelmapRepresentation(
            layer, name, list(SEGMENT_COLORS[index % len(SEGMENT_COLORS)]))
    return segmentationNode
