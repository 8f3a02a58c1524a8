"""The Slicer module's logic on real MRML (slicer-core, no Qt): conversions, output nodes, rollback, process()."""
import hashlib
import importlib.util
import math
import os
import signal
import time
import shutil
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is needed for the Slicer module tests")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package has no MRML", allow_module_level=True)
import SimpleITK as sitk  # noqa: E402
import vtk  # noqa: E402

from textscf.errors import CancelledError, CheckpointError, InputError  # noqa: E402
from textscf import schedule  # noqa: E402
from textscf.results import RegistrationResult  # noqa: E402
from test_worker import has_ended  # noqa: E402

MODULE_PATH = Path(__file__).resolve().parents[1] / "TextSCFRegistration" / "TextSCFRegistration.py"
F = np.diag([-1.0, -1.0, 1.0])  # LPS <-> RAS


@pytest.fixture(scope="module")
def mod():
    spec = importlib.util.spec_from_file_location("TextSCFRegistration", MODULE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def logic(mod, scene):
    return mod.TextSCFRegistrationLogic(scene=scene)


def rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


# Non-identity geometry: rotation, anisotropic spacing, offset.
FIXED_DIRECTION_RAS = rotation(0.25, -0.15, 0.5)
FIXED_SPACING = np.array([0.9, 1.4, 2.2])
FIXED_ORIGIN_RAS = np.array([12.5, -30.0, 7.25])
FIXED_SHAPE_IJK = (14, 12, 10)


def ijk_to_ras(direction, spacing, origin):
    m = np.eye(4)
    m[:3, :3] = direction @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def vtk_matrix(array):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def numpy_matrix(m):
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def add_volume(scene, array_kji, matrix, name="volume", class_name="vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(class_name, name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array_kji))
    node.SetIJKToRASMatrix(vtk_matrix(matrix))
    return node


def ijk_to_ras_of(node):
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return numpy_matrix(m)


def grid_ras(node):
    """RAS of every voxel, [k, j, i, 3]."""
    dims = node.GetImageData().GetDimensions()
    k, j, i = np.meshgrid(np.arange(dims[2]), np.arange(dims[1]), np.arange(dims[0]), indexing="ij")
    ijk = np.stack([i, j, k], -1).astype(float)
    m = ijk_to_ras_of(node)
    return ijk @ m[:3, :3].T + m[:3, 3]


def smooth_displacement_lps(points_lps):
    x, y, z = points_lps[..., 0], points_lps[..., 1], points_lps[..., 2]
    return np.stack([1.5 * np.sin(y / 9.0) + 0.3, -1.2 * np.cos(x / 11.0), 0.8 * np.sin(z / 7.0 + x / 13.0)], -1)


@pytest.fixture
def fixed_node(scene):
    i, j, k = FIXED_SHAPE_IJK
    array = np.arange(i * j * k, dtype=np.float32).reshape(k, j, i) * 0.5 - 20.0
    return add_volume(scene, array, ijk_to_ras(FIXED_DIRECTION_RAS, FIXED_SPACING, FIXED_ORIGIN_RAS), "fixed")


@pytest.fixture
def moving_node(scene):
    rng = np.random.default_rng(3)
    array = rng.normal(size=(9, 11, 13)).astype(np.float32)
    return add_volume(scene, array, ijk_to_ras(rotation(-0.1, 0.2, 0.05), np.array([1.1, 1.0, 1.7]),
                                               np.array([-5.0, 4.0, 20.0])), "moving")


def result_for(logic, fixed_node, jacobian_values=None, stats=None):
    """A RegistrationResult built by hand on the fixed grid with a known smooth LPS displacement."""
    reference = logic.volumeNodeToSitk(fixed_node)
    points_lps = grid_ras(fixed_node) @ F.T
    displacement = sitk.GetImageFromArray(smooth_displacement_lps(points_lps), isVector=True)
    displacement.CopyInformation(reference)
    if jacobian_values is None:
        jacobian_values = 1.0 + 0.3 * np.sin(points_lps[..., 0] / 5.0)
        jacobian_values[0, 0, :3] = [-0.2, 0.0, 0.01]
    jacobian = sitk.GetImageFromArray(jacobian_values.astype(np.float32))
    jacobian.CopyInformation(reference)
    warped = sitk.Cast(reference, sitk.sitkFloat32) * 2.0
    if stats is None:
        stats = {
            "sdlogj": 0.123, "folding_percent": 1.5, "jacobian_min": -0.2, "jacobian_max": 1.3,
            "max_displacement_mm": 2.4, "seconds_total": 4.2, "seconds_per_stage": {"load model": 1.0, "register": 3.2},
            "device": "cpu", "initial_alignment": "center: translation",
            "dice": {"liver": 0.9, "spleen": 0.8}, "dice_before": {"liver": 0.7, "spleen": 0.5},
            "hd95_mm": {"liver": 3.0, "spleen": 4.0}, "hd95_mm_before": {"liver": 9.0, "spleen": 12.0},
            "mean_dice": 0.85, "mean_dice_before": 0.6, "mean_hd95_mm": 3.5, "mean_hd95_mm_before": 10.5,
        }
    return RegistrationResult(displacement=displacement, warped=warped, jacobian=jacobian, stats=stats,
                              region_names=["background", "liver", "spleen"])


def node_ids(scene):
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def table_rows(table_node):
    return [[table_node.GetCellText(r, c) for c in range(table_node.GetNumberOfColumns())]
            for r in range(table_node.GetNumberOfRows())]


# ------------------------------------------------------------------------------------------------------------------
# The module imports without Qt and exposes its classes


def test_module_imports_without_qt_and_logic_is_usable(mod):
    assert mod.SLICER_APP_AVAILABLE is False
    assert mod.qt is None
    for name in ("TextSCFRegistration", "TextSCFRegistrationWidget", "TextSCFRegistrationLogic",
                 "TextSCFRegistrationTest"):
        assert hasattr(mod, name)
    with pytest.raises(RuntimeError, match="needs the 3D Slicer application"):
        mod.TextSCFRegistrationWidget()

    class Parent:
        pass

    parent = Parent()
    mod.TextSCFRegistration(parent)
    assert parent.categories == ["Registration"]
    assert "TextSCF" in parent.title and "textSCF" in parent.helpText


# ------------------------------------------------------------------------------------------------------------------
# Volume node <-> SimpleITK


def test_volume_node_to_sitk_geometry_and_values(logic, fixed_node):
    image = logic.volumeNodeToSitk(fixed_node)
    assert image.GetSize() == FIXED_SHAPE_IJK
    np.testing.assert_allclose(image.GetSpacing(), FIXED_SPACING, rtol=1e-12)
    np.testing.assert_allclose(image.GetOrigin(), F @ FIXED_ORIGIN_RAS, atol=1e-9)
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3), F @ FIXED_DIRECTION_RAS, atol=1e-9)
    # Every voxel lands at the same physical point (LPS = F RAS) in both worlds.
    m = ijk_to_ras_of(fixed_node)
    for ijk in [(0, 0, 0), (13, 0, 0), (0, 11, 9), (7, 5, 3), (13, 11, 9)]:
        ras = m[:3, :3] @ np.array(ijk, float) + m[:3, 3]
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint(ijk), F @ ras, atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), slicer.util.arrayFromVolume(fixed_node))
    assert image.GetPixelID() == sitk.sitkFloat32


def test_volume_round_trip_preserves_geometry_and_values(logic, scene, fixed_node):
    image = logic.volumeNodeToSitk(fixed_node)
    copy = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "copy")
    logic.updateVolumeNodeFromSitk(copy, image)
    np.testing.assert_allclose(ijk_to_ras_of(copy), ijk_to_ras_of(fixed_node), atol=1e-9)
    assert copy.GetImageData().GetDimensions() == fixed_node.GetImageData().GetDimensions()
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(copy), slicer.util.arrayFromVolume(fixed_node))
    # int64 label images are stored as int32 (VTK volumes cannot be long long)
    labels = sitk.Cast(image > 0, sitk.sitkInt64)
    labels_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    logic.updateVolumeNodeFromSitk(labels_node, labels)
    assert slicer.util.arrayFromVolume(labels_node).dtype == np.int32
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(labels_node), sitk.GetArrayFromImage(labels))


def test_volume_without_voxels_or_finite_values_is_an_input_error(logic, scene):
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="no voxels"):
        logic.volumeNodeToSitk(empty)
    nan = add_volume(scene, np.full((3, 4, 5), np.nan, np.float32), np.eye(4), "nan")
    with pytest.raises(InputError, match="no finite value"):
        logic.volumeNodeToSitk(nan)
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(rgb, np.zeros((3, 4, 5, 3), np.uint8))
    with pytest.raises(InputError, match="3 components"):
        logic.volumeNodeToSitk(rgb)


# ------------------------------------------------------------------------------------------------------------------
# Output transform: vtkOrientedGridTransform as TransformFromParent, displacement in RAS


def test_output_transform_matches_known_displacement(logic, scene, fixed_node, moving_node):
    result = result_for(logic, fixed_node)
    nodes = logic.createOutputNodes(result, fixed_node, moving_node)
    transform_node = nodes["outputTransformNode"]
    assert transform_node.GetClassName() == "vtkMRMLGridTransformNode"
    grid = transform_node.GetTransformFromParent()
    assert grid.GetClassName() == "vtkOrientedGridTransform"
    # Direction matrix and grid geometry are the fixed volume's (in RAS)
    direction = numpy_matrix(grid.GetGridDirectionMatrix())[:3, :3]
    np.testing.assert_allclose(direction, FIXED_DIRECTION_RAS, atol=1e-9)
    image = grid.GetDisplacementGrid()
    np.testing.assert_allclose(image.GetOrigin(), FIXED_ORIGIN_RAS, atol=1e-9)
    np.testing.assert_allclose(image.GetSpacing(), FIXED_SPACING, atol=1e-12)
    assert image.GetDimensions() == FIXED_SHAPE_IJK

    # At the voxel centres: T(x) = x + F d_LPS(F x)
    points_ras = grid_ras(fixed_node)
    expected = points_ras + smooth_displacement_lps(points_ras @ F.T) @ F.T
    for index in [(0, 0, 0), (3, 4, 5), (9, 11, 13), (5, 2, 7), (8, 10, 1)]:
        mapped = transform_node.GetTransformFromParent().TransformPoint(points_ras[index])
        np.testing.assert_allclose(mapped, expected[index], atol=1e-6)

    # Between voxel centres: same trilinear interpolation as ITK's displacement field transform, in RAS.
    itk_transform = result.transform()
    rng = np.random.default_rng(0)
    m = ijk_to_ras_of(fixed_node)
    for ijk in rng.uniform([1, 1, 1], [12, 10, 8], size=(20, 3)):
        ras = m[:3, :3] @ ijk + m[:3, 3]
        lps_mapped = np.array(itk_transform.TransformPoint(tuple(F @ ras)))
        np.testing.assert_allclose(grid.TransformPoint(ras), F @ lps_mapped, atol=1e-6)
        # and close to the analytic field (smooth)
        analytic = ras + F @ smooth_displacement_lps(F @ ras)
        np.testing.assert_allclose(grid.TransformPoint(ras), analytic, atol=0.1)

    # References, and the moving volume placed under the transform (no warped volume requested)
    assert transform_node.GetNodeReferenceID("fixedVolume") == fixed_node.GetID()
    assert transform_node.GetNodeReferenceID("movingVolume") == moving_node.GetID()
    assert moving_node.GetTransformNodeID() == transform_node.GetID()
    assert nodes["outputVolumeNode"] is None


def test_grid_transform_node_reads_back_as_the_same_displacement(logic, scene, fixed_node):
    result = result_for(logic, fixed_node)
    transform_node = scene.AddNewNodeByClass("vtkMRMLTransformNode", "t")
    logic.setGridTransformFromDisplacement(transform_node, result.displacement)
    sampled = logic.transformNodeToSitk(transform_node, fixed_node)
    assert isinstance(sampled, sitk.DisplacementFieldTransform)
    field = sampled.GetDisplacementField()
    np.testing.assert_allclose(sitk.GetArrayFromImage(field), sitk.GetArrayFromImage(result.displacement), atol=1e-6)
    np.testing.assert_allclose(field.GetOrigin(), result.displacement.GetOrigin(), atol=1e-9)


def test_volume_node_is_written_as_raw_nrrd_that_itk_reads(logic, fixed_node, tmp_path):
    from TextSCFRegistrationLib import conversions

    path = tmp_path / "fixed.nrrd"
    conversions.writeVolumeNode(fixed_node, str(path))
    read = sitk.ReadImage(str(path))
    expected = logic.volumeNodeToSitk(fixed_node)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), slicer.util.arrayFromVolume(fixed_node))
    np.testing.assert_allclose(read.GetOrigin(), expected.GetOrigin(), atol=1e-12)
    np.testing.assert_allclose(read.GetSpacing(), expected.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(read.GetDirection(), expected.GetDirection(), atol=1e-12)


def test_nrrd_written_by_itk_is_read_into_a_given_buffer(logic, fixed_node, tmp_path):
    from TextSCFRegistrationLib import nrrd

    displacement = result_for(logic, fixed_node).displacement
    path = tmp_path / "field.nrrd"
    sitk.WriteImage(sitk.Cast(displacement, sitk.sitkVectorFloat32), str(path), False)
    header = nrrd.read_header(str(path))
    assert header.components == 3 and header.size == FIXED_SHAPE_IJK and header.dtype == np.float32
    np.testing.assert_allclose(header.origin, displacement.GetOrigin(), atol=1e-12)
    np.testing.assert_allclose(header.spacing, displacement.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(header.direction.ravel(), displacement.GetDirection(), atol=1e-12)
    buffer = np.empty(header.shape, header.dtype)
    header.readInto(buffer)
    np.testing.assert_array_equal(buffer, sitk.GetArrayFromImage(displacement).astype(np.float32))
    with pytest.raises(ValueError, match="cannot read"):
        header.readInto(np.empty(header.shape, np.float64))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match="truncated"):
        nrrd.read_header(str(path))


def test_displacement_file_fills_the_grid_transform_in_its_own_type(logic, scene, fixed_node, tmp_path):
    """The engine process's float32 field becomes a float32 grid (no float64 copy), RAS, equal to ITK's transform."""
    displacement = sitk.Cast(result_for(logic, fixed_node).displacement, sitk.sitkVectorFloat32)
    path = tmp_path / "displacement.nrrd"
    sitk.WriteImage(displacement, str(path), False)
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "t")
    logic.setGridTransformFromDisplacement(node, str(path))
    grid = node.GetTransformFromParent().GetDisplacementGrid()
    assert grid.GetPointData().GetScalars().GetDataType() == vtk.VTK_FLOAT
    vectors = slicer.util.arrayFromGridTransform(node)
    np.testing.assert_array_equal(vectors, sitk.GetArrayFromImage(displacement) * np.array([-1, -1, 1], np.float32))
    itk = sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))
    m = ijk_to_ras_of(fixed_node)
    for ijk in np.random.default_rng(1).uniform([1, 1, 1], [12, 10, 8], size=(10, 3)):
        ras = m[:3, :3] @ ijk + m[:3, 3]
        np.testing.assert_allclose(node.GetTransformFromParent().TransformPoint(ras),
                                   F @ np.array(itk.TransformPoint(tuple(F @ ras))), atol=1e-5)


def test_linear_initial_transform_becomes_lps_affine(logic, scene, fixed_node):
    matrix_ras = np.eye(4)
    matrix_ras[:3, :3] = rotation(0.1, 0.2, -0.3) * 1.05
    matrix_ras[:3, 3] = [4.0, -7.0, 2.5]
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "initial")
    node.SetMatrixTransformToParent(vtk_matrix(matrix_ras))  # moving under it is aligned to the fixed volume
    affine = logic.transformNodeToSitk(node, fixed_node)
    assert isinstance(affine, sitk.AffineTransform)
    from_parent = node.GetTransformFromParent()
    for ras in [(0.0, 0.0, 0.0), (10.0, -3.0, 5.0), (-20.0, 14.0, -8.0)]:
        expected_ras = np.array(from_parent.TransformPoint(ras))  # fixed point -> moving point
        np.testing.assert_allclose(affine.TransformPoint(tuple(F @ np.array(ras))), F @ expected_ras, atol=1e-9)
    np.testing.assert_allclose(expected_ras, np.linalg.solve(matrix_ras, np.r_[ras, 1.0])[:3], atol=1e-9)


# ------------------------------------------------------------------------------------------------------------------
# Jacobian volume and colour table


def test_jacobian_volume_has_fixed_geometry_values_and_diverging_display(mod, logic, scene, fixed_node, moving_node):
    result = result_for(logic, fixed_node)
    nodes = logic.createOutputNodes(result, fixed_node, moving_node)
    jacobian = nodes["jacobianVolumeNode"]
    np.testing.assert_array_equal(ijk_to_ras_of(jacobian), ijk_to_ras_of(fixed_node))
    assert jacobian.GetImageData().GetDimensions() == fixed_node.GetImageData().GetDimensions()
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(jacobian), sitk.GetArrayFromImage(result.jacobian))
    assert slicer.util.arrayFromVolume(jacobian)[0, 0, 0] == pytest.approx(-0.2)

    display = jacobian.GetDisplayNode()
    color = nodes["jacobianColorNode"]
    assert display.GetColorNodeID() == color.GetID()
    assert display.GetAutoWindowLevel() == 0
    assert display.GetWindow() == pytest.approx(mod.JACOBIAN_DISPLAY_MAX - mod.JACOBIAN_DISPLAY_MIN)
    assert display.GetLevel() == pytest.approx(1.0)  # white (|J| = 1) in the middle of the window
    assert color.GetNumberOfColors() == 256

    def entry(j, quantize=None):
        """Colour Slicer shows for Jacobian j: window/level maps to 0..255 (optionally quantised to unsigned char,
        truncated or rounded), the table spans 0..255."""
        x = (j - mod.JACOBIAN_DISPLAY_MIN) / (mod.JACOBIAN_DISPLAY_MAX - mod.JACOBIAN_DISPLAY_MIN)
        if quantize is not None:
            x = quantize(np.clip(x * 255.0, 0, 255)) / 255.0
        index = int(np.clip(np.floor(x * 256), 0, 255))
        rgba = [0.0] * 4
        color.GetColor(index, rgba)
        return index, np.array(rgba[:3])

    for quantize in (None, np.floor, np.round):
        for folded in (-0.5, -0.001, 0.0):
            index, rgb = entry(folded, quantize)
            assert index == 0
            np.testing.assert_allclose(rgb, [0.0, 1.0, 0.0])  # bright green: folding
        assert np.all(entry(0.01, quantize)[1] != [0.0, 1.0, 0.0])  # clearly positive: not green
        assert np.all(entry(1.0, quantize)[1] > 0.97)
    index, rgb = entry(1.0)
    assert index == 128 and np.all(rgb > 0.97)            # white at 1
    _, rgb = entry(0.02)
    assert rgb[2] > rgb[0] + 0.4 and rgb[1] < 0.5          # strong blue near 0 (but not green)
    _, rgb = entry(0.5)
    assert rgb[2] > rgb[0] and rgb[2] > 0.8                 # blue below 1
    _, rgb = entry(1.5)
    assert rgb[0] > rgb[2] and rgb[0] > 0.8                 # red above 1
    _, rgb = entry(3.0)
    np.testing.assert_allclose(rgb, mod.JACOBIAN_HIGH_COLOR, atol=0.02)  # saturates red
    # Monotonic fades: blue to white on (0, 1) (red channel rises), white to red on (1, 2) (blue channel falls).
    below = [entry(j)[1][0] for j in np.linspace(0.05, 0.99, 20)]
    above = [entry(j)[1][2] for j in np.linspace(1.01, 1.99, 20)]
    assert np.all(np.diff(below) >= -1e-9) and below[-1] - below[0] > 0.6
    assert np.all(np.diff(above) <= 1e-9) and above[0] - above[-1] > 0.6
    # One table per scene: a second run reuses it
    again = logic.createOutputNodes(result_for(logic, fixed_node), fixed_node, moving_node)
    assert again["jacobianColorNode"] is color


def test_displacement_magnitude_volume(logic, scene, fixed_node, moving_node):
    result = result_for(logic, fixed_node)
    nodes = logic.createOutputNodes(result, fixed_node, moving_node, showDisplacementMagnitude=True)
    magnitude = nodes["displacementMagnitudeVolumeNode"]
    expected = np.linalg.norm(sitk.GetArrayFromImage(result.displacement), axis=-1)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(magnitude), expected, rtol=1e-6)
    np.testing.assert_array_equal(ijk_to_ras_of(magnitude), ijk_to_ras_of(fixed_node))


def test_warped_volume_output_keeps_moving_volume_untransformed(logic, scene, fixed_node, moving_node):
    result = result_for(logic, fixed_node)
    warped = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "warped")
    nodes = logic.createOutputNodes(result, fixed_node, moving_node, outputVolumeNode=warped)
    assert nodes["outputVolumeNode"] is warped
    np.testing.assert_allclose(slicer.util.arrayFromVolume(warped), 2.0 * slicer.util.arrayFromVolume(fixed_node))
    np.testing.assert_array_equal(ijk_to_ras_of(warped), ijk_to_ras_of(fixed_node))
    assert moving_node.GetTransformNodeID() is None


def test_outputs_follow_the_fixed_volume_parent_transform(logic, scene, fixed_node, moving_node):
    parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "fixed parent")
    fixed_node.SetAndObserveTransformNodeID(parent.GetID())
    nodes = logic.createOutputNodes(result_for(logic, fixed_node), fixed_node, moving_node)
    assert nodes["outputTransformNode"].GetTransformNodeID() == parent.GetID()
    assert nodes["jacobianVolumeNode"].GetTransformNodeID() == parent.GetID()


# ------------------------------------------------------------------------------------------------------------------
# Statistics table


def test_stats_table_holds_the_numbers(logic, scene, fixed_node, moving_node):
    nodes = logic.createOutputNodes(result_for(logic, fixed_node), fixed_node, moving_node)
    table = nodes["statsTableNode"]
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == [
        "Measure", "Region", "Value", "Before", "Note"]
    rows = table_rows(table)
    by_measure = {(r[0], r[1]): r for r in rows}
    assert float(by_measure[("SDlogJ", "")][2]) == pytest.approx(0.123)
    assert float(by_measure[("Folding |J| <= 0 (%)", "")][2]) == pytest.approx(1.5)
    assert float(by_measure[("Jacobian min", "")][2]) == pytest.approx(-0.2)
    assert float(by_measure[("Jacobian max", "")][2]) == pytest.approx(1.3)
    assert float(by_measure[("Max displacement (mm)", "")][2]) == pytest.approx(2.4)
    assert float(by_measure[("Run time (s)", "")][2]) == pytest.approx(4.2)
    assert float(by_measure[("Run time: register (s)", "")][2]) == pytest.approx(3.2)
    assert by_measure[("Device", "")][4] == "cpu"
    assert by_measure[("Initial alignment", "")][4] == "center: translation"
    assert float(by_measure[("Dice", "liver")][2]) == pytest.approx(0.9)
    assert float(by_measure[("Dice", "liver")][3]) == pytest.approx(0.7)
    assert float(by_measure[("Dice", "spleen")][3]) == pytest.approx(0.5)
    assert float(by_measure[("HD95 (mm)", "spleen")][2]) == pytest.approx(4.0)
    assert float(by_measure[("HD95 (mm)", "spleen")][3]) == pytest.approx(12.0)
    assert float(by_measure[("Dice", "mean")][2]) == pytest.approx(0.85)
    assert float(by_measure[("HD95 (mm)", "mean")][3]) == pytest.approx(10.5)
    # Region rows follow the region order (index 0, the background, is not a row)
    assert [r[1] for r in rows if r[0] == "Dice"] == ["liver", "spleen", "mean"]
    # numeric columns are numeric
    assert table.GetTable().GetColumnByName("Value").GetClassName() == "vtkDoubleArray"
    assert math.isnan(table.GetTable().GetColumnByName("Before").GetValue(0))


def test_stats_table_without_moving_segmentation_has_no_overlap_rows(logic, fixed_node, moving_node):
    stats = {"sdlogj": 0.05, "folding_percent": 0.0, "jacobian_min": 0.6, "jacobian_max": 1.4,
             "seconds_total": 1.0, "device": "cuda"}
    nodes = logic.createOutputNodes(result_for(logic, fixed_node, stats=stats), fixed_node, moving_node)
    measures = [r[0] for r in table_rows(nodes["statsTableNode"])]
    assert "Dice" not in measures and "HD95 (mm)" not in measures
    assert measures[:4] == ["SDlogJ", "Folding |J| <= 0 (%)", "Jacobian min", "Jacobian max"]


# ------------------------------------------------------------------------------------------------------------------
# Label maps and segmentations -> label map on the reference grid


def test_labelmap_node_becomes_label_image(logic, scene, fixed_node):
    i, j, k = FIXED_SHAPE_IJK
    labels = np.zeros((k, j, i), np.int16)
    labels[2:5, 3:8, 4:10] = 6
    labels[6:9, 1:4, 1:5] = 1
    node = add_volume(scene, labels, ijk_to_ras_of(fixed_node), "labels", "vtkMRMLLabelMapVolumeNode")
    image, names, values = logic.labelImageFromNode(node, fixed_node, ["liver", "spleen"], [6, 1])
    assert (names, values) == (["liver", "spleen"], [6, 1])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    assert image.GetPixelID() == sitk.sitkInt32
    np.testing.assert_allclose(image.GetOrigin(), F @ FIXED_ORIGIN_RAS, atol=1e-9)
    # Without a region list: the values present, named "label <v>" (no colour table in the scene)
    _, names, values = logic.labelImageFromNode(node, fixed_node)
    assert (names, values) == (["label 1", "label 6"], [1, 6])


def test_labelmap_on_another_grid_is_resampled_to_the_reference(logic, scene, fixed_node):
    # A coarser labelmap (axis aligned) covering the fixed volume: label = 1 where RAS x > 20, else 2
    coarse = np.zeros((20, 30, 30), np.uint8)
    origin = np.array([-10.0, -50.0, -20.0])
    spacing = np.array([2.0, 2.0, 3.0])
    k, j, i = np.meshgrid(np.arange(20), np.arange(30), np.arange(30), indexing="ij")
    x = origin[0] + i * spacing[0]
    coarse[:] = np.where(x > 20.0, 1, 2)
    node = add_volume(scene, coarse, ijk_to_ras(np.eye(3), spacing, origin), "coarse", "vtkMRMLLabelMapVolumeNode")
    image, _, _ = logic.labelImageFromNode(node, fixed_node, ["a", "b"], [1, 2])
    assert image.GetSize() == FIXED_SHAPE_IJK
    labels = sitk.GetArrayFromImage(image)
    ras = grid_ras(fixed_node)
    clear = np.abs(ras[..., 0] - 21.0) > 2.5  # away from the boundary between the two coarse voxel columns
    np.testing.assert_array_equal(labels[clear], np.where(ras[..., 0] > 21.0, 1, 2)[clear])


def test_segmentation_node_becomes_label_image_by_segment_name(logic, scene, fixed_node):
    i, j, k = FIXED_SHAPE_IJK
    labels = np.zeros((k, j, i), np.int16)
    labels[2:5, 3:8, 4:10] = 3
    labels[6:9, 1:4, 1:5] = 7
    labelmap = add_volume(scene, labels, ijk_to_ras_of(fixed_node), "lm", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    seg = segmentation.GetSegmentation()
    ids = [seg.GetNthSegmentID(n) for n in range(seg.GetNumberOfSegments())]
    seg.GetSegment(ids[0]).SetName("Liver")      # label 3 in the labelmap
    seg.GetSegment(ids[1]).SetName("spleen")     # label 7
    scene.RemoveNode(labelmap)

    # Matched to the regions by name (case-insensitive), drawn with the regions' label values
    image, names, values = logic.labelImageFromNode(segmentation, fixed_node, ["spleen", "liver", "aorta"], [1, 6, 8])
    out = sitk.GetArrayFromImage(image)
    expected = np.zeros_like(labels, dtype=np.int32)
    expected[labels == 3] = 6
    expected[labels == 7] = 1
    np.testing.assert_array_equal(out, expected)
    assert (names, values) == (["spleen", "liver", "aorta"], [1, 6, 8])

    # Without regions: segment names, values 1..N in segment order
    image, names, values = logic.labelImageFromNode(segmentation, fixed_node)
    assert (names, values) == (["Liver", "spleen"], [1, 2])
    expected = np.zeros_like(labels, dtype=np.int32)
    expected[labels == 3] = 1
    expected[labels == 7] = 2
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)

    with pytest.raises(InputError, match="none of the segments"):
        logic.labelImageFromNode(segmentation, fixed_node, ["kidney"], [2])


def test_segmentation_written_from_label_image_reads_back(logic, scene, fixed_node):
    reference = logic.volumeNodeToSitk(fixed_node)
    array = np.zeros(sitk.GetArrayFromImage(reference).shape, np.uint8)
    array[1:4, 2:6, 3:9] = 2
    array[5:8, 7:10, 2:5] = 5
    label_image = sitk.GetImageFromArray(array)
    label_image.CopyInformation(reference)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    logic.sitkToSegmentationNode(label_image, segmentation, ["kidney", "ghost", "liver"], [2, 3, 5], fixed_node)
    seg = segmentation.GetSegmentation()
    assert [seg.GetNthSegment(n).GetName() for n in range(seg.GetNumberOfSegments())] == ["kidney", "liver"]
    back, _, _ = logic.labelImageFromNode(segmentation, fixed_node, ["kidney", "liver"], [2, 5])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)


def _totalsegmentator_labels():
    """A small label array [k, j, i] with TotalSegmentator v2 values: liver 5, kidney_right 2, aorta 52, small bowel 18."""
    i, j, k = FIXED_SHAPE_IJK
    labels = np.zeros((k, j, i), np.int16)
    labels[1:5, 2:7, 3:9] = 5
    labels[6:9, 1:4, 1:5] = 2
    labels[5:9, 8:11, 9:12] = 52
    labels[0:2, 9:12, 0:4] = 18
    return labels


def test_totalsegmentator_segment_names_map_to_the_preset_regions(logic, scene, fixed_node):
    from textscf.presets import load_preset

    labels = _totalsegmentator_labels()
    reference = logic.volumeNodeToSitk(fixed_node)
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(reference)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "TotalSegmentator")
    logic.sitkToSegmentationNode(label_image, segmentation, ["liver", "kidney_right", "aorta", "small_bowel"],
                                 [5, 2, 52, 18], fixed_node)
    preset = load_preset("abdomen-ct")  # BTCV values: liver 6, right kidney 2, aorta 8
    image, names, values = logic.labelImageFromNode(segmentation, fixed_node, preset.region_names,
                                                    preset.label_values)
    expected = np.zeros(labels.shape, np.int32)
    expected[labels == 5] = 6
    expected[labels == 2] = 2
    expected[labels == 52] = 8  # small bowel has no region: left out
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)
    assert names == list(preset.region_names)
    # The regions a TotalSegmentator segmentation carries, under the names the model knows
    assert logic.regionsOfNode(segmentation) == (["liver", "right kidney", "aorta", "small_bowel"], [1, 2, 3, 4])


def test_labelmap_with_totalsegmentator_colour_names_is_relabelled_by_name(logic, scene, fixed_node):
    from textscf.presets import load_preset

    labels = _totalsegmentator_labels()
    node = add_volume(scene, labels, ijk_to_ras_of(fixed_node), "ts labels", "vtkMRMLLabelMapVolumeNode")
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "TotalSegmentator colours")
    colors.SetTypeToUser()
    colors.SetNumberOfColors(118)
    total = load_preset("totalsegmentator")
    colors.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for value, name in total.label_names.items():
        colors.SetColor(value, name, 0.5, 0.5, 0.5, 1.0)
    node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())

    preset = load_preset("abdomen-ct")
    image, _, _ = logic.labelImageFromNode(node, fixed_node, preset.region_names, preset.label_values)
    expected = np.zeros(labels.shape, np.int32)
    expected[labels == 5] = 6
    expected[labels == 2] = 2
    expected[labels == 52] = 8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)
    assert logic.regionsOfNode(node) == (["right kidney", "liver", "small_bowel", "aorta"], [2, 5, 18, 52])

    # With the TotalSegmentator preset the values already fit: kept as they are (18 is one of its background labels)
    image, _, _ = logic.labelImageFromNode(node, fixed_node, total.region_names, total.label_values)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    assert 18 in total.background_labels


def test_labelmap_with_totalsegmentator_values_and_no_names_is_mapped_by_name(logic, scene, fixed_node):
    """No colour names: the values themselves (liver 5, aorta 52, colon 20, vertebra 27, ...) give the scheme away."""
    from textscf.presets import load_preset

    labels = _totalsegmentator_labels()
    labels[9, 0:3, 10:14] = 20  # colon
    labels[9, 5:8, 12:14] = 27  # vertebra L5
    node = add_volume(scene, labels, ijk_to_ras_of(fixed_node), "ts values", "vtkMRMLLabelMapVolumeNode")
    preset = load_preset("abdomen-ct")
    image, _, _ = logic.labelImageFromNode(node, fixed_node, preset.region_names, preset.label_values)
    expected = np.zeros(labels.shape, np.int32)
    expected[labels == 5] = 6  # TotalSegmentator's liver is the region "liver" (BTCV 6), not "esophagus" (5)
    expected[labels == 2] = 2
    expected[labels == 52] = 8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)
    assert len(logic.notes) == 1 and "'totalsegmentator' preset" in logic.notes[0]
    assert "mapped by name" in logic.notes[0]
    rows = logic.statsRows({"notes": logic.notes})
    assert ("Note", "", logic.notes[0]) == (rows[-1][0], rows[-1][1], rows[-1][4])

    # A labelmap whose values fit the chosen regions is left alone
    logic.notes.clear()
    image, _, _ = logic.labelImageFromNode(node, fixed_node, ["liver", "right kidney", "aorta"], [5, 2, 52])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    assert logic.notes == []


def test_regions_of_segmentation_and_validation(mod, logic, scene):
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    for name in ("lung", "heart"):  # (slicer-core registers no converter rules: AddEmptySegment fails there)
        layer = slicer.vtkOrientedImageData()
        layer.SetDimensions(2, 2, 2)
        layer.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        layer.GetPointData().GetScalars().Fill(1)
        segmentation.AddSegmentFromBinaryLabelmapRepresentation(layer, name, [1.0, 0.0, 0.0])
    assert logic.regionsOfNode(segmentation) == (["lung", "heart"], [1, 2])
    assert mod.TextSCFRegistrationLogic.validateRegions([("liver", 6), (" lung ", 14)]) == (["liver", "lung"], [6, 14])
    for bad, message in [([], "empty"), ([("", 1)], "empty name"), ([("a", 0)], "positive"),
                         ([("a", 1), ("A", 2)], "twice"), ([("a", 1), ("b", 1)], "two regions")]:
        with pytest.raises(ValueError, match=message):
            mod.TextSCFRegistrationLogic.validateRegions(bad)


def test_preset_matching_recognises_bundled_region_sets(logic):
    from textscf.presets import load_preset

    preset = load_preset("abdomen-ct")
    names = [n.upper().replace(" ", "_") for n in reversed(preset.region_names)]
    assert logic.presetMatching(names, list(reversed(preset.label_values))) == "abdomen-ct"
    assert logic.presetMatching(list(preset.region_names), [v + 1 for v in preset.label_values]) is None
    assert logic.presetMatching(["lung"], [1]) is None


def test_thread_safe_stream_defers_worker_output_to_the_main_thread(mod):
    import io
    import threading

    target = io.StringIO()
    stream = mod._ThreadSafeStream(target)
    stream.write("main ")
    worker = threading.Thread(target=lambda: stream.write("worker"))
    worker.start()
    worker.join()
    assert target.getvalue() == "main "
    stream.flushPending()
    assert target.getvalue() == "main worker"
    assert stream.getvalue() == "main worker"  # other attributes pass through


# ------------------------------------------------------------------------------------------------------------------
# All or nothing: cancel or failure leaves the scene as it was


def test_cancel_while_creating_outputs_removes_new_nodes(logic, scene, fixed_node, moving_node):
    before = node_ids(scene)
    calls = []

    def cancel_on_third_poll():
        calls.append(1)
        return len(calls) >= 3  # after the transform and warped steps, the Jacobian step is cancelled

    with pytest.raises(CancelledError):
        logic.createOutputNodes(result_for(logic, fixed_node), fixed_node, moving_node,
                                cancelCallback=cancel_on_third_poll)
    assert len(calls) == 3
    assert node_ids(scene) == before
    assert moving_node.GetTransformNodeID() is None


def test_failure_restores_existing_output_nodes(logic, scene, fixed_node, moving_node):
    # Existing outputs with content of their own
    old_transform = scene.AddNewNodeByClass("vtkMRMLTransformNode", "old transform")
    old_matrix = np.eye(4)
    old_matrix[:3, 3] = [1.0, 2.0, 3.0]
    old_transform.SetMatrixTransformToParent(vtk_matrix(old_matrix))
    old_jacobian = add_volume(scene, np.full((2, 3, 4), 7.0, np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), "old jac")
    old_jacobian.CreateDefaultDisplayNodes()
    old_color_id = old_jacobian.GetDisplayNode().GetColorNodeID()
    old_table = scene.AddNewNodeByClass("vtkMRMLTableNode", "old table")
    previous_parent = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moving parent")
    moving_node.SetAndObserveTransformNodeID(previous_parent.GetID())
    before = node_ids(scene)

    # A statistic that cannot be a number fails the table step, after transform and Jacobian were written
    bad_stats = {"sdlogj": "not a number", "device": "cpu"}
    with pytest.raises(ValueError):
        logic.createOutputNodes(result_for(logic, fixed_node, stats=bad_stats), fixed_node, moving_node,
                                outputTransformNode=old_transform, jacobianVolumeNode=old_jacobian,
                                statsTableNode=old_table, showDisplacementMagnitude=True)
    assert node_ids(scene) == before
    assert old_transform.IsLinear()
    m = vtk.vtkMatrix4x4()
    old_transform.GetMatrixTransformToParent(m)
    np.testing.assert_allclose(numpy_matrix(m), old_matrix)
    assert old_transform.GetNodeReferenceID("fixedVolume") is None
    assert old_transform.GetAttribute("TextSCF.Output") is None and old_jacobian.GetAttribute("TextSCF.Output") is None
    assert old_jacobian.GetImageData().GetDimensions() == (4, 3, 2)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(old_jacobian), 7.0)
    np.testing.assert_allclose(ijk_to_ras_of(old_jacobian), np.diag([2.0, 2.0, 2.0, 1.0]))
    assert old_jacobian.GetDisplayNode().GetColorNodeID() == old_color_id  # display restored too
    assert old_jacobian.GetDisplayNode().GetAutoWindowLevel() == 1
    assert old_table.GetNumberOfRows() == 0
    assert moving_node.GetTransformNodeID() == previous_parent.GetID()


def test_existing_output_nodes_are_filled_in_place(logic, scene, fixed_node, moving_node):
    transform = scene.AddNewNodeByClass("vtkMRMLTransformNode", "mine")
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "my table")
    nodes = logic.createOutputNodes(result_for(logic, fixed_node), fixed_node, moving_node,
                                    outputTransformNode=transform, statsTableNode=table)
    assert nodes["outputTransformNode"] is transform and nodes["statsTableNode"] is table
    assert transform.GetTransformFromParent().GetClassName() == "vtkOrientedGridTransform"
    assert table.GetNumberOfRows() > 5


def test_process_with_nan_volume_fails_and_leaves_the_scene_unchanged(logic, scene, fixed_node):
    nan = add_volume(scene, np.full((4, 5, 6), np.nan, np.float32), np.eye(4), "nan moving")
    before = node_ids(scene)
    with pytest.raises(InputError, match="no finite value"):
        logic.process(fixed_node, nan, {"device": "cpu"})
    assert node_ids(scene) == before
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    before = node_ids(scene)
    with pytest.raises(InputError, match="no voxels"):
        logic.process(empty, fixed_node)
    with pytest.raises(InputError, match="different nodes"):
        logic.process(fixed_node, fixed_node)
    assert node_ids(scene) == before


# ------------------------------------------------------------------------------------------------------------------
# Checkpoint download (URL + SHA-256)


def test_download_checkpoint_verifies_sha256(mod, tmp_path):
    source = tmp_path / "model.pt"
    source.write_bytes(b"textscf weights" * 1000)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    path = mod.TextSCFRegistrationLogic.downloadCheckpoint(source.as_uri(), digest.upper(), str(cache))
    assert Path(path).read_bytes() == source.read_bytes()
    assert Path(path).parent == cache and Path(path).name.endswith("model.pt")
    # cached: a second call does not need the source any more
    source.unlink()
    assert mod.TextSCFRegistrationLogic.downloadCheckpoint(source.as_uri(), digest, str(cache)) == path

    other = tmp_path / "other.pt"
    other.write_bytes(b"something else")
    with pytest.raises(CheckpointError, match="SHA-256"):
        mod.TextSCFRegistrationLogic.downloadCheckpoint(other.as_uri(), "0" * 64, str(cache))
    assert sorted(p.name for p in cache.iterdir()) == [Path(path).name]  # nothing left behind
    with pytest.raises(CheckpointError, match="64 hexadecimal"):
        mod.TextSCFRegistrationLogic.downloadCheckpoint(other.as_uri(), "abc", str(cache))
    with pytest.raises(CheckpointError, match="could not download"):
        mod.TextSCFRegistrationLogic.downloadCheckpoint((tmp_path / "missing.pt").as_uri(), "0" * 64, str(cache))


def test_download_checkpoint_reports_progress_and_cancels(mod, tmp_path):
    """The widget runs the download on a worker thread: progress goes through a callback, Cancel stops it."""
    source = tmp_path / "big.pt"
    source.write_bytes(np.random.default_rng(0).bytes(3 * (1 << 20) + 123))  # four 1 MiB blocks
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    fractions = []
    mod.TextSCFRegistrationLogic.downloadCheckpoint(source.as_uri(), digest, str(cache),
                                                    progressCallback=fractions.append)
    assert len(fractions) == 4 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert 0.3 < fractions[0] < 0.35

    polls = []
    with pytest.raises(CancelledError):
        mod.TextSCFRegistrationLogic.downloadCheckpoint(source.as_uri(), "1" * 64, str(tmp_path / "other"),
                                                        cancelCallback=lambda: polls.append(1) or len(polls) >= 2)
    assert len(polls) == 2 and list((tmp_path / "other").iterdir()) == []  # no partial file left


def test_dependency_check_lists_only_missing_packages(mod):
    missing = mod.TextSCFRegistrationLogic.missingRequirements()
    for module_name, requirement in mod.ENGINE_REQUIREMENTS.items():
        assert (requirement in missing) == (importlib.util.find_spec(module_name) is None)


def test_requirements_have_one_home_that_pyproject_follows(mod):
    import tomllib

    root = Path(__file__).resolve().parents[1]
    shipped = [r["requirement"] for r in mod._engineRequirements()]
    declared = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert sorted(shipped) == sorted(declared)
    assert mod.TORCH_REQUIREMENT == ">=2.1" and "torch" not in mod.ENGINE_REQUIREMENTS
    assert mod.ENGINE_REQUIREMENTS["open_clip"] == "open_clip_torch>=2.24"
    # einops: nothing of ours imports it, but MONAI's SwinUNETR (the segmentor) does, lazily: it must be installed
    swin = importlib.util.find_spec("monai.networks.nets.swin_unetr")
    assert '"einops"' in Path(swin.origin).read_text(encoding="utf-8") and "einops>=0.7" in shipped


def test_install_pins_every_installed_package(mod, logic, monkeypatch):
    """pip may only add packages: numpy, SimpleITK, torch... stay at the versions Slicer has."""
    import importlib.metadata

    calls = []

    def fake_pip_install(args):
        constraints = Path(args[args.index("--constraint") + 1])
        calls.append((list(args), constraints.read_text().splitlines(), constraints))

    monkeypatch.setattr(slicer.util, "pip_install", fake_pip_install, raising=False)
    monkeypatch.setattr(mod.TextSCFRegistrationLogic, "missingRequirements", staticmethod(lambda: ["nibabel>=5.0"]))
    assert logic.ensureDependencies(askConfirmation=False)
    (args, pins, path), = calls
    assert args[0] == "nibabel>=5.0" and args[1] == "--constraint"
    for package in ("numpy", "simpleitk", "torch", "vtk"):
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert f"{package}=={version}" in pins
    assert f"numpy=={importlib.metadata.version('numpy')}" in pins
    assert not path.exists()  # the temporary constraints file is removed

    def failing_pip_install(args):
        raise RuntimeError("ResolutionImpossible: monai 1.4.0 requires numpy<2.0")

    monkeypatch.setattr(slicer.util, "pip_install", failing_pip_install, raising=False)
    with pytest.raises(RuntimeError, match="without changing a package this Slicer already has.*numpy<2.0"):
        logic.ensureDependencies(askConfirmation=False)


def test_torch_is_checked_against_what_monai_needs(mod):
    problem = mod.TextSCFRegistrationLogic.torchProblem
    assert problem("2.14.1", "2.3.5") is None
    assert problem("2.2.2", "1.26.4") is None  # numpy 1: MONAI 1.4 installs with PyTorch 2.2
    message = problem("2.2.2+cpu", "2.1.3")  # the last Intel-Mac PyTorch with Slicer 5.10's numpy 2
    assert "numpy 2.1.3" in message and "2.4.1 or later" in message and "PyTorch Utils" in message
    assert "needs PyTorch 2.1 or later" in problem("2.0.1", "1.26.0")
    assert problem("2.4.1", "2.0.0") is None


# ------------------------------------------------------------------------------------------------------------------
# End to end through textscf.pipeline.register (skipped until the pipeline exists)


def _pipeline_has_register():
    try:
        from textscf import pipeline
    except Exception:
        return False
    return hasattr(pipeline, "register") and hasattr(pipeline, "RegistrationOptions")


def _has_example_pair():
    try:
        from textscf.phantom import make_example_pair  # noqa: F401
    except Exception:
        return False
    return True


needs_pipeline = pytest.mark.skipif(not (_pipeline_has_register() and _has_example_pair()),
                                    reason="textscf.pipeline.register / textscf.phantom.make_example_pair missing")


@pytest.fixture(scope="module")
def example_pair():
    from textscf.phantom import make_example_pair

    return make_example_pair()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, example_pair):
    """A small one-hot model over the example pair's regions (random weights): fast on the CPU, no downloads."""
    import torch

    from textscf.checkpoint import save_checkpoint
    from textscf.networks import TextSCFConfig, TextSCFNet

    names = [example_pair["label_names"][v] for v in sorted(example_pair["label_names"])]
    n = len(names) + 1
    cfg = TextSCFConfig(num_regions=n, text_dim=n, start_channels=2, hidden_channels=8, region_names=names,
                        label_values=sorted(example_pair["label_names"]), input_shape=(48, 48, 64),
                        spacing=(8.0, 8.0, 8.0))
    torch.manual_seed(0)
    net = TextSCFNet(cfg, torch.eye(n)).eval()
    return str(save_checkpoint(net, tmp_path_factory.mktemp("model") / "tiny.pt"))


@needs_pipeline
def test_process_end_to_end_on_the_example_pair(logic, scene, example_pair, tiny_checkpoint):
    pair = logic.loadExamplePair(scene, pair=example_pair)
    fixed, moving = pair["fixedVolumeNode"], pair["movingVolumeNode"]
    seg = pair["fixedSegmentationNode"].GetSegmentation()
    assert seg.GetNumberOfSegments() > 5
    assert seg.GetNthSegment(0).GetName() in pair["regionNames"]

    # Preset regions: the segments are matched to the preset's names and drawn with its label values.
    stages = []
    logic.keepJobFolder = True  # to compare the nodes with the engine process's files
    nodes = logic.process(fixed, moving, {"checkpoint": tiny_checkpoint, "device": "cpu", "preset": "abdomen-ct"},
                          fixedSegmentationNode=pair["fixedSegmentationNode"],
                          movingSegmentationNode=pair["movingSegmentationNode"],
                          progressCallback=lambda stage, fraction: stages.append((stage, fraction)))
    fractions = [f for _, f in stages]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert "register" in [s for s, _ in stages]

    transform = nodes["outputTransformNode"]
    assert transform.GetTransformFromParent().GetClassName() == "vtkOrientedGridTransform"
    assert moving.GetTransformNodeID() == transform.GetID()
    assert pair["movingSegmentationNode"].GetTransformNodeID() == transform.GetID()
    jacobian = nodes["jacobianVolumeNode"]
    np.testing.assert_array_equal(ijk_to_ras_of(jacobian), ijk_to_ras_of(fixed))
    assert jacobian.GetImageData().GetDimensions() == fixed.GetImageData().GetDimensions()
    result = logic.lastResult
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(jacobian),
                                  sitk.GetArrayFromImage(sitk.ReadImage(result.jacobian.path)))
    # The transform is the engine's displacement, in RAS
    field = sitk.ReadImage(result.displacement.path, sitk.sitkVectorFloat64)
    engine_transform = sitk.DisplacementFieldTransform(field)
    for probe in (grid_ras(fixed)[20, 30, 40], grid_ras(fixed)[5, 60, 17]):
        lps = np.array(engine_transform.TransformPoint(tuple(F @ probe)))
        np.testing.assert_allclose(transform.GetTransformFromParent().TransformPoint(probe), F @ lps, atol=1e-4)
    shutil.rmtree(logic.job.folder)

    rows = table_rows(nodes["statsTableNode"])
    regions = [r[1] for r in rows if r[0] == "Dice"]
    assert "mean" in regions and len(regions) >= 2
    mean = [r for r in rows if r[0] == "Dice" and r[1] == "mean"][0]
    assert float(mean[2]) == pytest.approx(result.stats["mean_dice"], rel=1e-4)
    assert float(mean[3]) == pytest.approx(result.stats["mean_dice_before"], rel=1e-4)
    assert [r for r in rows if r[0] == "Device"][0][4] == "cpu"


def engine_pids(logic):
    """The running engine process and, under a launcher, the interpreter it started (Linux /proc)."""
    pid = logic.job.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [pid] + ([int(c) for c in children.read_text().split()] if children.exists() else [])


@needs_pipeline
@pytest.mark.parametrize("stage", ["Reading inputs", "register"])
def test_cancel_kills_the_engine_process_mid_run_and_leaves_the_scene_unchanged(logic, scene, example_pair,
                                                                              tiny_checkpoint, stage):
    """Cancel while the engine process starts (importing torch) or refines the network on the pair: the process is
    ended within a second (terminate, then kill), its job folder removed, and the scene keeps exactly its nodes."""
    pair = logic.loadExamplePair(scene, pair=example_pair)
    before = node_ids(scene)
    seen = {}

    def progress(current, fraction, seconds_left=None):
        running = logic.job is not None and logic.job.process is not None  # the logic's own first line precedes it
        if current == stage and running and "pid" not in seen:
            seen.update(pid=logic.job.process.pid, folder=logic.job.folder)

    def cancel():
        if "pid" in seen and "requested" not in seen:
            seen["requested"] = time.monotonic()
        return "requested" in seen

    with pytest.raises(CancelledError, match="engine process was stopped"):
        logic.process(pair["fixedVolumeNode"], pair["movingVolumeNode"],
                      {"checkpoint": tiny_checkpoint, "device": "cpu", "preset": "abdomen-ct",
                       "refine_iterations": 500, "refine_field_iterations": 0},
                      fixedSegmentationNode=pair["fixedSegmentationNode"], progressCallback=progress,
                      cancelCallback=cancel)
    latency = time.monotonic() - seen["requested"]
    print(f"cancel during '{stage}': engine process ended {logic.job.cancelSeconds:.3f} s after the kill request, "
          f"process() returned {latency:.3f} s after Cancel")
    assert latency < 1.5 and logic.job.cancelSeconds <= latency
    assert has_ended(seen["pid"])
    assert not os.path.exists(seen["folder"])
    assert node_ids(scene) == before
    assert pair["movingVolumeNode"].GetTransformNodeID() is None


def write_launcher(folder):
    """A stand-in for PythonSlicer: starts the real interpreter as its child and exits with its status, 128 + N when
    signal N ended it (as launchers and shells report it)."""
    import sys

    launcher = Path(folder) / "PythonLauncher"
    launcher.write_text(f"#!{sys.executable}\nimport subprocess, sys\n"
                        f"status = subprocess.call([{sys.executable!r}] + sys.argv[1:])\n"
                        "sys.exit(128 - status if status < 0 else status)\n")
    launcher.chmod(0o755)
    return str(launcher)


@needs_pipeline
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="child processes are listed from Linux /proc")
def test_cancel_also_ends_the_interpreter_a_launcher_started(logic, scene, example_pair, tiny_checkpoint, tmp_path,
                                                             monkeypatch):
    """In Slicer the worker runs through PythonSlicer, a launcher that starts the real interpreter as its child:
    Cancel ends the whole process group, the child included (a launcher stands in for PythonSlicer here)."""
    from TextSCFRegistrationLib import engineprocess

    monkeypatch.setattr(engineprocess, "pythonExecutable", lambda: write_launcher(tmp_path))
    pair = logic.loadExamplePair(scene, pair=example_pair)
    before = node_ids(scene)
    seen = {}

    def progress(stage, fraction, seconds_left=None):
        if stage == "register" and "pids" not in seen:
            seen["pids"] = engine_pids(logic)

    with pytest.raises(CancelledError):
        logic.process(pair["fixedVolumeNode"], pair["movingVolumeNode"],
                      {"checkpoint": tiny_checkpoint, "device": "cpu", "preset": "abdomen-ct",
                       "refine_iterations": 500, "refine_field_iterations": 0},
                      fixedSegmentationNode=pair["fixedSegmentationNode"], progressCallback=progress,
                      cancelCallback=lambda: "pids" in seen)
    assert len(seen["pids"]) == 2, "the launcher and the interpreter it started"
    time.sleep(0.2)  # the interpreter, reparented once killed, is reaped by its new parent
    assert all(has_ended(pid) for pid in seen["pids"])
    assert node_ids(scene) == before


@needs_pipeline
@pytest.mark.parametrize("through_launcher", [False, True])
def test_a_crashed_engine_process_is_an_error_and_leaves_the_scene_unchanged(logic, scene, example_pair,
                                                                             tiny_checkpoint, through_launcher,
                                                                             tmp_path, monkeypatch):
    """The engine's interpreter killed as the system kills it when memory runs out (SIGKILL) during the
    registration, started directly or through a launcher as PythonSlicer: a clear error, no new node, the job
    folder removed."""
    from TextSCFRegistrationLib import engineprocess

    if through_launcher:
        if not Path("/proc/self/task").is_dir():
            pytest.skip("child processes are listed from Linux /proc")
        monkeypatch.setattr(engineprocess, "pythonExecutable", lambda: write_launcher(tmp_path))
    pair = logic.loadExamplePair(scene, pair=example_pair)
    before = node_ids(scene)
    seen = {}

    def progress(stage, fraction, seconds_left=None):
        if stage == "register" and "pid" not in seen:
            seen.update(pid=engine_pids(logic)[-1], folder=logic.job.folder)  # the interpreter, under a launcher too
            os.kill(seen["pid"], signal.SIGKILL)

    from TextSCFRegistrationLib.engineprocess import EngineProcessError

    with pytest.raises(EngineProcessError, match="ended by SIGKILL.*memory runs out.*scene was left as it was"):
        logic.process(pair["fixedVolumeNode"], pair["movingVolumeNode"],
                      {"checkpoint": tiny_checkpoint, "device": "cpu", "preset": "abdomen-ct"},
                      fixedSegmentationNode=pair["fixedSegmentationNode"],
                      movingSegmentationNode=pair["movingSegmentationNode"], progressCallback=progress)
    assert "pid" in seen and has_ended(seen["pid"])
    assert not os.path.exists(seen["folder"])
    assert node_ids(scene) == before
    assert pair["movingVolumeNode"].GetTransformNodeID() is None


@needs_pipeline
def test_an_engine_error_keeps_its_class_and_message_and_leaves_the_scene_unchanged(logic, scene, example_pair,
                                                                                    tmp_path):
    """The engine process refuses the job (a checkpoint that does not exist): its one-line JSON error becomes the
    same TextSCFError subclass on the Slicer side, with the engine's message; no node, no job folder remains."""
    pair = logic.loadExamplePair(scene, pair=example_pair)
    before = node_ids(scene)
    missing = tmp_path / "no-such-model.pt"
    with pytest.raises(CheckpointError, match="no-such-model.pt"):
        logic.process(pair["fixedVolumeNode"], pair["movingVolumeNode"],
                      {"checkpoint": str(missing), "device": "cpu", "preset": "abdomen-ct"})
    assert node_ids(scene) == before
    assert logic.job.process is None and not os.path.exists(logic.job.folder)


@needs_pipeline
def test_process_with_regions_from_the_segment_names(logic, scene, example_pair, tiny_checkpoint):
    """No preset, no region list: the fixed segmentation's segment names are the prompts."""
    pair = logic.loadExamplePair(scene, pair=example_pair)
    nodes = logic.process(pair["fixedVolumeNode"], pair["movingVolumeNode"],
                          {"checkpoint": tiny_checkpoint, "device": "cpu"},
                          fixedSegmentationNode=pair["fixedSegmentationNode"],
                          movingSegmentationNode=pair["movingSegmentationNode"])
    segmentation = pair["fixedSegmentationNode"].GetSegmentation()
    segment_names = [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]
    assert logic.lastResult.region_names == ["background"] + segment_names
    dice_regions = [r[1] for r in table_rows(nodes["statsTableNode"]) if r[0] == "Dice"]
    assert dice_regions == segment_names + ["mean"]
    assert not os.path.exists(logic.job.folder)  # the engine process's job folder is gone


def _bundled_model_available():
    if not _pipeline_has_register():
        return False
    from textscf import pipeline

    try:
        pipeline.bundled_model_path()
    except Exception:
        return False
    return True


@needs_pipeline
@pytest.mark.slow
@pytest.mark.skipif(not _bundled_model_available(), reason="no bundled model in this installation yet")
def test_module_self_test_runs_headless(mod):
    """The in-Slicer self-test (bundled model, example pair, Dice after > before) also runs on slicer-core."""
    mod.TextSCFRegistrationTest().runTest()


# ------------------------------------------------------------------------------------------------------------------
# The model in use and the chosen regions: decided before Apply


def test_model_plan_switches_to_a_fresh_network_for_the_brain_preset(mod, logic, scene, fixed_node):
    plan = logic.modelPlan({"preset": "brain-mri", "device": "cpu", "refine_iterations": 12,
                            "refine_field_iterations": 30}, fixed_node, torchAvailable=True)
    assert plan["switched"]
    assert plan["options"]["checkpoint"] == "fresh"
    # the fresh schedule, or more where the user asked for more
    steps = max(12, schedule.FRESH_NETWORK_STEPS), max(30, schedule.FRESH_FIELD_STEPS)
    assert (plan["options"]["refine_iterations"], plan["options"]["refine_field_iterations"]) == steps
    assert plan["options"]["preset"] == "brain-mri"
    message = plan["message"]
    assert "the bundled model knows only its 13 training regions" in message.lower()
    assert "trained on CT, not MRI" in message and "fresh network" in message and "the CPU" in message
    # 14 x 12 x 10 voxels -> a 16 x 16 x 16 grid at half resolution
    expected = schedule.estimate_refine_seconds((16, 16, 16), *steps, "cpu", schedule.FRESH_FIELD_LEVELS)
    assert plan["estimatedSeconds"] == pytest.approx(expected) and "about 1 s" in message


def test_model_plan_keeps_the_bundled_model_for_regions_it_knows(logic, fixed_node):
    for preset in ("abdomen-ct", "totalsegmentator"):
        plan = logic.modelPlan({"preset": preset, "device": "cpu", "refine_iterations": 12,
                                "refine_field_iterations": 30}, fixed_node, torchAvailable=True)
        assert not plan["switched"] and plan["options"].get("checkpoint") is None
        # The bundled model's grid (8 mm), the field steps on it subdivided to 4 mm
        config = logic.modelConfig()
        expected = schedule.with_steps(schedule.default_schedule(
            "checkpoint", config["input_shape"], "cpu", grid_spacing=config["spacing"]), 12, 30).estimated_seconds
        assert expected == pytest.approx(schedule.estimate_refine_seconds(
            config["input_shape"], 12, 30, "cpu", field_subdivision=schedule.field_subdivision_for(config["spacing"])))
        assert plan["estimatedSeconds"] == pytest.approx(expected)
        assert (f"refined on this pair (12 + 30 iterations, {schedule.describe_duration(expected)} on the CPU)"
                in plan["message"])
    # Segment names as TotalSegmentator writes them are regions the model knows
    plan = logic.modelPlan({"region_names": ["liver", "kidney_right"], "label_values": [1, 2], "device": "cpu"},
                           fixed_node, torchAvailable=True)
    assert not plan["switched"] and plan["message"] == ""


def test_model_plan_for_a_new_region_and_without_torch(logic, fixed_node):
    options = {"region_names": ["liver", "lung"], "label_values": [6, 20], "device": "cpu", "refine_iterations": 200}
    plan = logic.modelPlan(options, fixed_node, torchAvailable=True)
    assert plan["switched"] and "not lung" in plan["message"]
    assert plan["options"]["refine_iterations"] == 200  # more than the default is kept
    assert options.get("checkpoint") is None  # the caller's options are not modified
    plan = logic.modelPlan(options, fixed_node, torchAvailable=False)
    assert not plan["switched"] and "on Apply, once PyTorch is installed" in plan["message"]
    plan = logic.modelPlan({"checkpoint": "fresh", "preset": "abdomen-ct", "refine_iterations": 0}, fixed_node)
    assert "above 0" in plan["message"]


def test_automatic_schedule_is_the_engines_default_schedule(mod, logic, fixed_node):
    """Apply with the automatic schedule runs what `textscf register` runs without options: the engine's schedule."""
    logic_class = mod.TextSCFRegistrationLogic
    assert logic_class.refineSteps(True, 5, 2) == {"refine_iterations": None, "refine_field_iterations": None}
    assert logic_class.refineSteps(True, 5, 2, "fresh") == {"refine_iterations": schedule.FRESH_NETWORK_STEPS,
                                                           "refine_field_iterations": schedule.FRESH_FIELD_STEPS}
    assert logic_class.refineSteps(False, 5, 2) == {"refine_iterations": 5, "refine_field_iterations": 2}
    plan = logic.modelPlan({"preset": "abdomen-ct", "device": "cpu", "refine_iterations": None,
                            "refine_field_iterations": None}, fixed_node, torchAvailable=True)
    config = logic.modelConfig()
    bundled = schedule.default_schedule("checkpoint", config["input_shape"], "cpu", grid_spacing=config["spacing"])
    assert not plan["switched"] and plan["estimatedSeconds"] == pytest.approx(bundled.estimated_seconds)
    assert f"({bundled.network_steps} + {bundled.field_steps} iterations" in plan["message"]
    plan = logic.modelPlan({"preset": "brain-mri", "device": "cpu", "refine_iterations": None,
                            "refine_field_iterations": None}, fixed_node, torchAvailable=True)
    assert plan["switched"] and plan["options"]["refine_iterations"] == schedule.FRESH_NETWORK_STEPS
    assert logic_class.progressText("register", 35.2) == "register (about 35 s left)"
    assert logic_class.progressText("register", None) == "register"


@needs_pipeline
def test_process_reports_every_refinement_step_and_registers_without_a_segmentation(logic, scene, example_pair,
                                                                                    tiny_checkpoint):
    """The Slicer bar gets the engine's numbers: stage, a fraction that moves with each refinement step, the time
    left. Without any segmentation or segmentor the pair still registers (no regions: the shared filter alone)."""
    pair = logic.loadExamplePair(scene, pair=example_pair)
    updates = []
    nodes = logic.process(pair["fixedVolumeNode"], pair["movingVolumeNode"],
                          {"checkpoint": tiny_checkpoint, "device": "cpu", "preset": "abdomen-ct",
                           **logic.refineSteps(True, 12, 30)},
                          progressCallback=lambda stage, fraction, secondsLeft: updates.append(
                              (stage, fraction, secondsLeft)))
    fractions = [fraction for _, fraction, _ in updates]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    during = [update for update in updates if update[0] == "register"]
    ran = schedule.default_schedule("checkpoint", (48, 48, 64), "cpu", has_regions=False)
    stats = logic.lastResult.stats
    steps_run = stats["refine"]["iterations"] + stats["refine"]["field_iterations"]  # field steps may stop early
    assert steps_run > 0 and len(during) >= steps_run and all(left is not None for _, _, left in during[2:])
    assert stats["schedule"]["regions"] is False and stats["schedule"]["network_steps"] == ran.network_steps
    notes = [row[4] for row in table_rows(nodes["statsTableNode"]) if row[0] == "Note"]
    assert any(note.startswith("schedule: ") and "no regions" in note for note in notes)
    assert nodes["outputTransformNode"].GetTransformFromParent().GetClassName() == "vtkOrientedGridTransform"


@needs_pipeline
def test_switched_plan_registers_a_region_the_bundled_model_does_not_know(logic, scene, example_pair):
    """Adding "lung" (the .ui's own example) to the example pair's organs: the plan's fresh network registers it."""
    pair = logic.loadExamplePair(scene, pair=example_pair)
    names = list(pair["regionNames"]) + ["lung"]
    values = list(pair["labelValues"]) + [99]
    plan = logic.modelPlan({"region_names": names, "label_values": values, "device": "cpu", "init": "none"},
                           pair["fixedVolumeNode"], torchAvailable=True)
    assert plan["switched"]
    options = dict(plan["options"], refine_iterations=2, refine_field_iterations=0, fresh_grid_factor=4.0)
    with pytest.warns(UserWarning, match="'lung' \\(label 99\\)"):  # the example pair has no lung voxels
        nodes = logic.process(pair["fixedVolumeNode"], pair["movingVolumeNode"], options,
                              fixedSegmentationNode=pair["fixedSegmentationNode"])
    assert nodes["outputTransformNode"].GetTransformFromParent().GetClassName() == "vtkOrientedGridTransform"
    assert logic.lastResult.stats["checkpoint"] == "fresh"
    assert logic.lastResult.region_names[-1] == "lung"


# ------------------------------------------------------------------------------------------------------------------
# No freezes, no double starts; a self-test that skips where the engine cannot run


def test_apply_is_disabled_while_anything_runs(mod, scene, fixed_node, moving_node):
    state = mod.TextSCFRegistrationLogic.applyState
    assert state(fixed_node, moving_node, busy=False)[0]
    enabled, tip = state(fixed_node, moving_node, busy=True)
    assert not enabled and "Cancel" in tip
    assert state(fixed_node, None, busy=False) == (False, "Select the fixed and moving volumes.")
    assert not state(fixed_node, fixed_node, busy=False)[0]


def test_gpu_is_offered_once_torch_sees_one(mod, monkeypatch):
    logic_class = mod.TextSCFRegistrationLogic
    monkeypatch.setattr(logic_class, "cudaAvailable", staticmethod(lambda: True))
    assert [v for _, v in logic_class.deviceChoices(detectGpu=True)] == ["auto", "cpu", "cuda"]
    assert [v for _, v in logic_class.deviceChoices(detectGpu=False)] == ["auto", "cpu"]  # at setup, before torch
    monkeypatch.setattr(logic_class, "cudaAvailable", staticmethod(lambda: False))
    assert [v for _, v in logic_class.deviceChoices(detectGpu=True)] == ["auto", "cpu"]


def test_self_test_skips_with_a_message_without_the_dependencies(mod, monkeypatch):
    monkeypatch.setattr(mod.TextSCFRegistrationLogic, "missingRequirements", staticmethod(lambda: ["monai>=1.3"]))
    shown = []
    test = mod.TextSCFRegistrationTest()
    monkeypatch.setattr(test, "delayDisplay", lambda message, *args, **kwargs: shown.append(message))
    monkeypatch.setattr(test, "test_RegisterExamplePair", lambda: pytest.fail("must not run without monai"))
    test.runTest()
    assert shown == [test.skipReason] and "skipped" in shown[0] and "monai>=1.3" in shown[0]
    assert "press Apply once" in shown[0]

    monkeypatch.setattr(mod.TextSCFRegistrationLogic, "missingRequirements", staticmethod(lambda: []))
    assert mod.TextSCFRegistrationTest.missingDependenciesMessage() == ""  # torch is installed here


@needs_pipeline
def test_process_with_totalsegmentator_segment_names(logic, scene, example_pair, tiny_checkpoint):
    """Segments named as TotalSegmentator names them register exactly as the preset's own names do."""
    from textscf.presets import load_preset

    options = {"checkpoint": tiny_checkpoint, "device": "cpu", "preset": "abdomen-ct", "init": "none"}
    pair = logic.loadExamplePair(scene, pair=example_pair)
    logic.process(pair["fixedVolumeNode"], pair["movingVolumeNode"], options,
                  fixedSegmentationNode=pair["fixedSegmentationNode"],
                  movingSegmentationNode=pair["movingSegmentationNode"])
    reference = logic.lastResult.stats["dice_before"]

    total = load_preset("totalsegmentator")
    totalName = {region: aliases[0] for region, aliases in zip(total.region_names, total.aliases)}
    for key in ("fixedSegmentationNode", "movingSegmentationNode"):
        segmentation = pair[key].GetSegmentation()
        for n in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(n)
            segment.SetName(totalName[segment.GetName()])
    assert segmentation.GetNthSegment(1).GetName() in ("kidney_right", "kidney_left", "gallbladder", "liver")
    pair["movingVolumeNode"].SetAndObserveTransformNodeID(None)
    pair["movingSegmentationNode"].SetAndObserveTransformNodeID(None)
    logic.process(pair["fixedVolumeNode"], pair["movingVolumeNode"], options,
                  fixedSegmentationNode=pair["fixedSegmentationNode"],
                  movingSegmentationNode=pair["movingSegmentationNode"])
    assert logic.lastResult.stats["dice_before"] == reference
    assert set(reference) >= {"liver", "right kidney", "portal and splenic vein"}


# ------------------------------------------------------------------------------------------------------------------
# Automatic segmentation of both images


@pytest.fixture(scope="module")
def random_swin_weights(tmp_path_factory):
    """A random-init SwinUNETR (tiny, 14 classes as MONAI's BTCV bundle) standing in for the bundle. Its background
    logit is raised so that the 'organs' it finds (noise, from random weights) stay small."""
    import torch
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=12)
    with torch.no_grad():
        net.out.conv.conv.bias.zero_()
        net.out.conv.conv.bias[0] = 6.0
    path = tmp_path_factory.mktemp("swin") / "swin_random.pt"
    torch.save(net.state_dict(), path)
    return str(path)


FAST_SEGMENTOR = {"roi_size": (64, 64, 64), "target_spacing": (6.0, 6.0, 6.0), "overlap": 0.0}


@needs_pipeline
def test_apply_without_segmentations_segments_both_images(logic, scene, example_pair, tiny_checkpoint,
                                                          random_swin_weights):
    from textscf.presets import load_preset

    logic.segmentorSettings = FAST_SEGMENTOR
    pair = logic.loadExamplePair(scene, pair=example_pair)
    fixed, moving = pair["fixedVolumeNode"], pair["movingVolumeNode"]
    for key in ("fixedSegmentationNode", "movingSegmentationNode"):  # two plain volumes, as a clinician has them
        scene.RemoveNode(pair[key])
    stages = []
    nodes = logic.process(fixed, moving, {"checkpoint": tiny_checkpoint, "device": "cpu", "preset": "abdomen-ct",
                                          "segmentor_weights": random_swin_weights, "segmentor_feature_size": 12},
                          progressCallback=lambda stage, fraction: stages.append((stage, fraction)))
    assert "Segmenting the fixed image" in [s for s, _ in stages] and "Segmenting the moving image" in [
        s for s, _ in stages]
    fractions = [f for _, f in stages]
    assert fractions == sorted(fractions)

    organs = set(load_preset("abdomen-ct").region_names)
    for key, volume in (("fixedSegmentationNode", fixed), ("movingSegmentationNode", moving)):
        node = nodes[key]
        assert node.IsA("vtkMRMLSegmentationNode") and node.GetScene() is scene
        assert node.GetName() == f"{volume.GetName()} TextSCF segmentation"
        segmentation = node.GetSegmentation()
        names = {segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())}
        assert names and names <= organs
    transform = nodes["outputTransformNode"]
    assert transform.GetTransformFromParent().GetClassName() == "vtkOrientedGridTransform"
    assert moving.GetTransformNodeID() == transform.GetID()
    assert nodes["movingSegmentationNode"].GetTransformNodeID() == transform.GetID()  # warped segmentation shown
    assert nodes["jacobianVolumeNode"].GetImageData().GetDimensions() == fixed.GetImageData().GetDimensions()
    rows = table_rows(nodes["statsTableNode"])
    assert [r for r in rows if r[0] == "Dice" and r[1] == "mean"], "organ overlap is scored"

    # The user's corrections come back: the automatic segmentations are ordinary inputs
    moving.SetAndObserveTransformNodeID(None)
    nodes["movingSegmentationNode"].SetAndObserveTransformNodeID(None)
    again = logic.process(fixed, moving, {"checkpoint": tiny_checkpoint, "device": "cpu", "preset": "abdomen-ct"},
                          fixedSegmentationNode=nodes["fixedSegmentationNode"],
                          movingSegmentationNode=nodes["movingSegmentationNode"])
    assert "fixedSegmentationNode" not in again


@needs_pipeline
def test_cancel_during_automatic_segmentation_leaves_the_scene_unchanged(logic, scene, example_pair,
                                                                        tiny_checkpoint, random_swin_weights):
    logic.segmentorSettings = FAST_SEGMENTOR
    pair = logic.loadExamplePair(scene, pair=example_pair)
    for key in ("fixedSegmentationNode", "movingSegmentationNode"):
        scene.RemoveNode(pair[key])
    before = node_ids(scene)
    stages = []

    def cancel():
        return any(stage == "Segmenting the moving image" for stage, _ in stages)

    with pytest.raises(CancelledError):
        logic.process(pair["fixedVolumeNode"], pair["movingVolumeNode"],
                      {"checkpoint": tiny_checkpoint, "device": "cpu", "preset": "abdomen-ct",
                       "segmentor_weights": random_swin_weights, "segmentor_feature_size": 12},
                      progressCallback=lambda stage, fraction: stages.append((stage, fraction)),
                      cancelCallback=cancel)
    assert node_ids(scene) == before


def test_segmentor_bundle_is_found_in_the_cache_once_downloaded(mod, tmp_path, monkeypatch):
    logic_class = mod.TextSCFRegistrationLogic
    monkeypatch.setattr(logic_class, "defaultCacheFolder", staticmethod(lambda: str(tmp_path)))
    folder = Path(logic_class.segmentorBundleFolder())
    assert folder == tmp_path / "models" / "swin_unetr_btcv_segmentation"
    assert logic_class.cachedSegmentorBundle() == ""  # the widget then asks before downloading
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "model.pt").write_bytes(b"weights")
    assert logic_class.cachedSegmentorBundle() == str(folder)


# ------------------------------------------------------------------------------------------------------------------
# Memory: the clinical-size benchmark (benchmarks/slicer_logic_memory.py) on a small pair


@needs_pipeline
@pytest.mark.skipif(not _bundled_model_available(), reason="no bundled model in this installation yet")
def test_memory_benchmark_runs_on_a_small_pair():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import slicer_logic_memory

    result = slicer_logic_memory.measure(shape=(96, 96, 48), spacing=(4.0, 4.0, 6.0))
    assert result["voxels"] == 96 * 96 * 48 and result["seconds"] > 0
    assert result["grid_transform_scalar_type"] == "float"
    # The engine's memory is its own process's; the Slicer side holds no torch (the engine imports it there).
    assert 0 < result["slicer_peak_gib"] < result["engine_peak_gib"] <= result["budget_gib"]
    assert result["within_budget"] and result["engine_seconds_per_stage"]["register"] >= 0
