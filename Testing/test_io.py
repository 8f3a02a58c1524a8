"""textscf.io: input checks (each error message names the problem and the fix), displacement-field files as
ITK/Slicer read them, and all-or-nothing output writing."""
from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from textscf import io as tio
from textscf.errors import InputError, OutputError
from textscf.spatial import grid_mismatch


def image(arr_ijk, spacing=(1.0, 1.5, 2.0), origin=(10.0, -20.0, 30.0), direction=None) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(arr_ijk).transpose(2, 1, 0)))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def oblique_direction():
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    return tuple(np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).ravel())


@pytest.fixture
def ct(tmp_path):
    arr = np.random.default_rng(0).integers(-1000, 1000, size=(12, 10, 8)).astype(np.int16)
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image(arr), str(path))
    return path, arr


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------- read_image
def test_read_image_ok(ct):
    path, arr = ct
    img = tio.read_image(path)
    assert img.GetPixelID() == sitk.sitkFloat32
    assert img.GetSize() == (12, 10, 8)
    assert img.GetSpacing() == (1.0, 1.5, 2.0) and img.GetOrigin() == (10.0, -20.0, 30.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), arr.astype(np.float32))


def test_read_image_missing_and_unreadable(tmp_path):
    with pytest.raises(InputError) as e:
        tio.read_image(tmp_path / "nope.nii.gz", role="moving image")
    assert "moving image" in str(e.value) and "not found" in str(e.value) and "nope.nii.gz" in str(e.value)
    assert "Fix" in str(e.value)
    bogus = tmp_path / "text.nii.gz"
    with gzip.open(bogus, "wt") as f:
        f.write("this is not an image")
    with pytest.raises(InputError, match=r"fixed image: cannot read .*text\.nii\.gz.*Fix: .*NIfTI"):
        tio.read_image(bogus)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="cannot read"):
        tio.read_image(tmp_path / "notes.txt")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(InputError, match="folder without a DICOM series"):
        tio.read_image(tmp_path / "emptydir")


@pytest.mark.parametrize("kind, words", [
    ("2d", ["2-D", "3-D volume is needed"]),
    ("4d", ["4-D", "extract one 3-D frame"]),
    ("slice", ["single slice"]),
    ("rgb", ["3 components", "scalar"]),
    ("empty", ["empty", "zero voxels"]),
])
def test_read_image_wrong_shape(tmp_path, kind, words):
    if kind == "2d":
        path = tmp_path / "a.mha"
        sitk.WriteImage(sitk.Image([8, 8], sitk.sitkFloat32) + 1.0, str(path))
    elif kind == "4d":
        path = tmp_path / "a.nii.gz"
        nib.save(nib.Nifti1Image(np.random.rand(8, 8, 8, 2).astype(np.float32), np.eye(4)), str(path))
    elif kind == "slice":
        path = tmp_path / "a.nii.gz"
        nib.save(nib.Nifti1Image(np.random.rand(10, 10, 1).astype(np.float32), np.eye(4)), str(path))
    elif kind == "rgb":
        path = tmp_path / "a.nrrd"
        sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3), str(path))
    else:
        path = tmp_path / "a.mha"
        path.write_text("ObjectType = Image\nNDims = 3\nBinaryData = True\nDimSize = 0 8 8\n"
                        "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    with pytest.raises(InputError) as e:
        tio.read_image(path, role="fixed image")
    msg = str(e.value)
    assert "fixed image" in msg and str(path) in msg and "Fix" in msg
    for w in words:
        assert w in msg


def test_read_image_nan_inf_and_constant(tmp_path):
    arr = np.random.rand(8, 8, 8).astype(np.float32)
    arr[0, 0, 0] = np.nan
    arr[1, 2, 3] = np.nan
    arr[4, 4, 4] = -np.inf
    path = tmp_path / "nan.nrrd"
    sitk.WriteImage(image(arr), str(path))
    with pytest.raises(InputError, match=r"3 non-finite voxels \(2 NaN, 1 Inf\) of 512.*Fix: replace"):
        tio.read_image(path)
    path = tmp_path / "const.nii.gz"
    sitk.WriteImage(image(np.full((8, 8, 8), 7, np.int16)), str(path))
    with pytest.raises(InputError, match=r"constant \(every voxel is 7\).*Fix"):
        tio.read_image(path, role="moving image")


def test_read_image_dicom_series(tmp_path):
    arr = np.random.default_rng(5).integers(-1000, 1000, size=(16, 14, 6)).astype(np.int16)
    vol = image(arr, spacing=(0.8, 0.8, 2.5), origin=(-5.0, 7.0, 12.0))
    series = tmp_path / "dicom"
    series.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(arr.shape[2]):
        sl = vol[:, :, k]
        for tag, value in [("0008|0060", "CT"), ("0020|000d", "1.2.3.4"), ("0020|000e", "1.2.3.4.5"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|0030", "0.8\\0.8"),
                           ("0020|0032", "\\".join(map(str, vol.TransformIndexToPhysicalPoint((0, 0, k))))),
                           ("0020|0013", str(k + 1)), ("0018|0050", "2.5")]:
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(series / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    img = tio.read_image(series)
    assert img.GetSize() == (16, 14, 6)
    np.testing.assert_allclose(img.GetSpacing(), (0.8, 0.8, 2.5), atol=1e-4)
    np.testing.assert_allclose(img.GetOrigin(), (-5.0, 7.0, 12.0), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), arr)


# ------------------------------------------------------------------------------------------- read_label_map
def test_read_label_map_ok_and_snapped(tmp_path):
    ref = image(np.random.rand(12, 10, 8).astype(np.float32), direction=oblique_direction())
    labels = np.zeros((12, 10, 8), np.float64)
    labels[2:6, 3:7, 1:5] = 3
    labels[7:10, 1:4, 4:7] = 12
    lab = image(labels, origin=(10.0 + 1e-5, -20.0, 30.0 - 2e-5), direction=oblique_direction())
    path = tmp_path / "labels.nii.gz"
    sitk.WriteImage(lab, str(path))
    out = tio.read_label_map(path, ref)
    assert out.GetPixelID() == sitk.sitkInt32
    assert out.GetOrigin() == ref.GetOrigin() and out.GetDirection() == ref.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out).transpose(2, 1, 0), labels.astype(np.int32))
    assert tio.read_label_map(path).GetPixelID() == sitk.sitkInt32  # no reference: no grid check


def test_read_label_map_values(tmp_path):
    arr = np.zeros((8, 8, 8), np.float32)
    arr[2:4, 2:4, 2:4] = 1.5
    arr[5, 5, 5] = 2.0
    path = tmp_path / "prob.nii.gz"
    sitk.WriteImage(image(arr), str(path))
    with pytest.raises(InputError) as e:
        tio.read_label_map(path, role="moving label map")
    msg = str(e.value)
    assert "moving label map" in msg and "8 non-integer voxel values (e.g. 1.5)" in msg
    assert "Fix" in msg and "label map" in msg
    arr = np.zeros((8, 8, 8), np.int16)
    arr[1, 1, 1] = -3
    path = tmp_path / "neg.nrrd"
    sitk.WriteImage(image(arr), str(path))
    with pytest.raises(InputError, match=r"negative labels \(minimum -3\).*Fix: use 0 for background"):
        tio.read_label_map(path)
    with pytest.raises(InputError, match="not found"):
        tio.read_label_map(tmp_path / "missing.nii.gz")


@pytest.mark.parametrize("change, word", [
    ({"size": (12, 10, 9)}, "size"),
    ({"spacing": (1.0, 1.5, 2.1)}, "spacing"),
    ({"origin": (10.0, -20.0, 31.0)}, "origin"),
    ({"direction": oblique_direction()}, "direction"),
])
def test_read_label_map_grid_mismatch(tmp_path, change, word):
    ref = image(np.random.rand(12, 10, 8).astype(np.float32))
    size = change.get("size", (12, 10, 8))
    lab = image(np.zeros(size, np.uint8), spacing=change.get("spacing", (1.0, 1.5, 2.0)),
                origin=change.get("origin", (10.0, -20.0, 30.0)), direction=change.get("direction"))
    path = tmp_path / "lab.nii.gz"
    sitk.WriteImage(lab, str(path))
    with pytest.raises(InputError) as e:
        tio.read_label_map(path, ref, role="fixed label map")
    msg = str(e.value)
    assert "fixed label map" in msg and "not on the voxel grid" in msg and word in msg
    assert "Fix: resample" in msg and "nearest" in msg


# ------------------------------------------------------------------------------------------- transforms
def test_read_transform(tmp_path):
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.0, 0.1, 0.0, -0.1, 1.0, 0.0, 0.0, 0.0, 1.1))
    affine.SetTranslation((1.0, 2.0, 3.0))
    tio.write_transform(affine, tmp_path / "init.h5")
    t = tio.read_transform(tmp_path / "init.h5")
    np.testing.assert_allclose(t.TransformPoint((5.0, 6.0, 7.0)), affine.TransformPoint((5.0, 6.0, 7.0)))
    tio.write_transform(affine, tmp_path / "init.tfm")
    assert tio.read_transform(tmp_path / "init.tfm").TransformPoint((1.0, 1.0, 1.0)) == pytest.approx(
        affine.TransformPoint((1.0, 1.0, 1.0)))

    field = sitk.Compose([sitk.Image([6, 5, 4], sitk.sitkFloat64) + v for v in (1.0, -2.0, 0.5)])
    tio.write_displacement_transform(field, tmp_path / "field.nii.gz")
    t = tio.read_transform(tmp_path / "field.nii.gz")
    assert t.GetName() == "DisplacementFieldTransform"
    np.testing.assert_allclose(t.TransformPoint((2.0, 2.0, 2.0)), (3.0, 0.0, 2.5), atol=1e-6)

    with pytest.raises(InputError, match=r"initial transform: file not found"):
        tio.read_transform(tmp_path / "missing.h5")
    (tmp_path / "junk.h5").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"cannot read .*junk\.h5.*Fix: give an ITK transform file"):
        tio.read_transform(tmp_path / "junk.h5")
    sitk.WriteTransform(sitk.TranslationTransform(2, (1.0, 2.0)), str(tmp_path / "t2.tfm"))
    with pytest.raises(InputError, match="2-D transform"):
        tio.read_transform(tmp_path / "t2.tfm")
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkFloat32), str(tmp_path / "scalar.nii.gz"))
    with pytest.raises(InputError, match="not a 3-D displacement field"):
        tio.read_transform(tmp_path / "scalar.nii.gz")


# ------------------------------------------------------------------------------------------- writers
def test_write_image_overwrite_rules(tmp_path, ct):
    path, arr = ct
    img = tio.read_image(path)
    out = tmp_path / "out.nrrd"
    out.write_text("old")
    with pytest.raises(OutputError, match=r"already exists.*--overwrite"):
        tio.write_image(img, out)
    assert out.read_text() == "old"
    tio.write_image(img, out, overwrite=True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))).transpose(2, 1, 0), arr)
    with pytest.raises(OutputError, match=r"unsupported extension '.mhd'.*\.nii\.gz"):
        tio.write_image(img, tmp_path / "x.mhd")
    with pytest.raises(OutputError, match="does not exist"):
        tio.write_image(img, tmp_path / "no" / "x.nii.gz")
    assert not [n for n in listing(tmp_path) if "textscf-tmp" in n]


def _field(shape=(7, 6, 5)):
    rng = np.random.default_rng(7)
    vec = rng.normal(size=(*shape, 3))  # [i, j, k, c]
    f = sitk.GetImageFromArray(vec.transpose(2, 1, 0, 3), isVector=True)
    f.SetSpacing((1.5, 2.0, 2.5))
    f.SetOrigin((-10.0, 20.0, 5.0))
    f.SetDirection(oblique_direction())
    return f, vec


def test_displacement_nifti_layout_is_slicer_dispvect(tmp_path):
    field, vec = _field()
    path = tmp_path / "d.nii.gz"
    tio.write_displacement_transform(field, path)
    nii = nib.load(str(path))
    hdr = nii.header
    assert int(hdr["intent_code"]) == 1006  # NIFTI_INTENT_DISPVECT, as Slicer writes and expects
    assert list(hdr["dim"][:6]) == [5, 7, 6, 5, 1, 3]
    assert int(hdr["qform_code"]) == 1 and int(hdr["sform_code"]) == 1
    d = np.array(oblique_direction()).reshape(3, 3)
    expected_affine = np.eye(4)
    expected_affine[:3, :3] = np.diag([-1, -1, 1]) @ d @ np.diag([1.5, 2.0, 2.5])
    expected_affine[:3, 3] = [10.0, -20.0, 5.0]
    np.testing.assert_allclose(nii.affine, expected_affine, atol=1e-5)
    data = np.asarray(nii.dataobj)
    assert data.shape == (7, 6, 5, 1, 3)
    np.testing.assert_allclose(data[:, :, :, 0, :], vec * [-1, -1, 1], atol=1e-6)  # RAS vectors
    back = sitk.ReadImage(str(path))  # ITK converts them back to LPS
    assert back.GetMetaData("intent_code") == "1006"
    np.testing.assert_allclose(sitk.GetArrayFromImage(back).transpose(2, 1, 0, 3), vec, atol=1e-6)
    np.testing.assert_allclose(back.GetDirection(), oblique_direction(), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), field.GetOrigin(), atol=1e-5)


def test_displacement_nifti_vector_intent_and_nrrd_and_h5(tmp_path):
    field, vec = _field()
    tio.write_displacement_transform(field, tmp_path / "v.nii", nifti_intent=1007)
    nii = nib.load(str(tmp_path / "v.nii"))
    assert int(nii.header["intent_code"]) == 1007 and list(nii.header["dim"][:6]) == [5, 7, 6, 5, 1, 3]
    np.testing.assert_allclose(np.asarray(nii.dataobj)[:, :, :, 0, :], vec, atol=1e-6)  # LPS, unconverted
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "v.nii"))).transpose(2, 1, 0, 3),
                               vec, atol=1e-6)

    tio.write_displacement_transform(field, tmp_path / "d.nrrd")
    header = (tmp_path / "d.nrrd").read_bytes().split(b"\n\n")[0].decode()
    for line in ("kinds: vector domain domain domain", "space: left-posterior-superior",
                 "intent_code:=1006", "displacement field type:=resampling"):
        assert line in header

    tio.write_displacement_transform(field, tmp_path / "d.h5")
    t = sitk.ReadTransform(str(tmp_path / "d.h5"))
    assert t.GetName() == "DisplacementFieldTransform"
    back = sitk.DisplacementFieldTransform(t).GetDisplacementField()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back).transpose(2, 1, 0, 3), vec)  # float64, exact
    assert field.GetSize() == (7, 6, 5)  # the caller's field was not consumed by the transform

    with pytest.raises(OutputError, match="already exists"):
        tio.write_displacement_transform(field, tmp_path / "d.h5")
    with pytest.raises(OutputError, match=r"unsupported extension '.vtk'"):
        tio.write_displacement_transform(field, tmp_path / "d.vtk")
    with pytest.raises(InputError, match="3 components"):
        tio.write_displacement_transform(sitk.Image([4, 4, 4], sitk.sitkFloat32), tmp_path / "s.h5")
    bad = sitk.GetImageFromArray(np.full((4, 4, 4, 3), np.nan), isVector=True)
    with pytest.raises(InputError, match="192 NaN/Inf"):
        tio.write_displacement_transform(bad, tmp_path / "nan.h5")
    with pytest.raises(InputError, match="nifti_intent"):
        tio.write_displacement_transform(field, tmp_path / "x.nii.gz", nifti_intent=1005)
    assert not (tmp_path / "s.h5").exists() and not (tmp_path / "nan.h5").exists()


# ------------------------------------------------------------------------------------------- OutputFolder
def test_output_folder_commits_on_success(tmp_path, ct):
    img = tio.read_image(ct[0])
    field, _ = _field()
    out_dir = tmp_path / "results" / "case1"  # created
    names = ["warped.nii.gz", "displacement.h5", "report.json", "qc.png", "raw.bin"]
    with tio.OutputFolder(out_dir, names=names) as out:
        out.write_image(img, "warped.nii.gz")
        out.write_displacement(field, "displacement.h5")
        out.write_text("report.json", '{"ok": true}')
        out.write_bytes("raw.bin", b"\x00\x01")
        with open(out.temp_path("qc.png"), "wb") as f:  # e.g. matplotlib's savefig
            f.write(b"png")
        out.temp_path("unused.txt")  # reserved, never written: not created
        # nothing visible before the block ends
        assert all(n.startswith(".") and "textscf-tmp" in n for n in listing(out_dir))
    assert listing(out_dir) == sorted(names)
    assert (out_dir / "report.json").read_text() == '{"ok": true}'
    assert (out_dir / "qc.png").read_bytes() == b"png"
    assert sitk.ReadTransform(str(out_dir / "displacement.h5")).GetName() == "DisplacementFieldTransform"
    assert sorted(p.name for p in out.written) == sorted(names)


def test_output_folder_refuses_overwrite_before_any_work(tmp_path):
    (tmp_path / "warped.nii.gz").write_text("old warped")
    (tmp_path / "report.json").write_text("old report")
    with pytest.raises(OutputError) as e:
        with tio.OutputFolder(tmp_path, names=["warped.nii.gz", "report.json", "qc.png"]):
            raise AssertionError("the block must not run")
    msg = str(e.value)
    assert "warped.nii.gz" in msg and "report.json" in msg and "qc.png" not in msg
    assert "--overwrite" in msg and "another folder" in msg
    assert listing(tmp_path) == ["report.json", "warped.nii.gz"]
    assert (tmp_path / "warped.nii.gz").read_text() == "old warped"
    # an undeclared existing name is refused when it is first used
    with tio.OutputFolder(tmp_path) as out:
        with pytest.raises(OutputError, match="already exists"):
            out.write_text("report.json", "new")
    assert (tmp_path / "report.json").read_text() == "old report"


def test_output_folder_overwrite_replaces(tmp_path):
    (tmp_path / "report.json").write_text("old")
    with tio.OutputFolder(tmp_path, overwrite=True, names=["report.json"]) as out:
        out.write_text("report.json", "new")
        assert (tmp_path / "report.json").read_text() == "old"  # replaced only at the end
    assert (tmp_path / "report.json").read_text() == "new"
    assert listing(tmp_path) == ["report.json"]


def test_output_folder_exception_leaves_no_new_files(tmp_path, ct):
    img = tio.read_image(ct[0])
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "report.json").write_text("old")
    with pytest.raises(RuntimeError, match="network exploded"):
        with tio.OutputFolder(folder, overwrite=True, names=["warped.nii.gz", "report.json"]) as out:
            out.write_image(img, "warped.nii.gz")
            out.write_text("report.json", "new")
            raise RuntimeError("network exploded")
    assert listing(folder) == ["report.json"]
    assert (folder / "report.json").read_text() == "old"


def test_output_folder_unwritable_and_bad_names(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=r"cannot create the output folder .*file\.txt/sub.*Fix"):
        with tio.OutputFolder(blocker / "sub"):
            pass
    with pytest.raises(OutputError, match="Fix: choose a folder"):
        with tio.OutputFolder(blocker):  # a file, not a folder
            pass
    if os.geteuid() != 0:  # root ignores permission bits; the cases above fail for root too
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(OutputError, match="not writable"):
                with tio.OutputFolder(ro):
                    pass
        finally:
            ro.chmod(0o700)
    with pytest.raises(OutputError, match="plain file name"):
        with tio.OutputFolder(tmp_path / "o", names=["../escape.txt"]):
            pass
    with tio.OutputFolder(tmp_path / "o2") as out:
        with pytest.raises(OutputError, match="plain file name"):
            out.write_text("sub/x.txt", "x")
        with pytest.raises(OutputError, match="use one of"):
            out.write_image(sitk.Image([2, 2, 2], sitk.sitkFloat32), "x.png")
    with pytest.raises(OutputError, match="context manager"):
        tio.OutputFolder(tmp_path).temp_path("x.txt")


# ------------------------------------------------------------------------------------------- Slicer reads them
@pytest.mark.parametrize("name, intent", [("d.h5", 1006), ("d.nii.gz", 1006), ("d.nrrd", 1006), ("d.mha", 1006),
                                          ("d1007.nii.gz", 1007)])
def test_slicer_reads_displacement_files_as_the_same_resampling_transform(tmp_path, name, intent):
    """Slicer's own transform storage node (slicer-core MRML) loads each file as TransformFromParent, in RAS,
    mapping fixed points to the same moving points as ITK does."""
    mrml = pytest.importorskip("slicer").MRMLCore
    from textscf import spatial as sp

    grid = sp.ModelGrid((20, 18, 16), (1.3, 0.9, 1.7), (-21.5, 14.0, 33.0), oblique_direction())
    pts = grid.physical_points()
    u = np.stack([2.5 * np.sin(pts[..., 1] / 9.0), 2.0 * np.cos(pts[..., 2] / 11.0),
                  1.5 * np.sin(pts[..., 0] / 13.0 + 0.4)], axis=0)
    field = sp.array_to_image(u, grid)
    path = tmp_path / name
    tio.write_displacement_transform(field, path, nifti_intent=intent)

    scene = mrml.vtkMRMLScene()
    node = mrml.vtkMRMLTransformNode()
    scene.AddNode(node)
    storage = mrml.vtkMRMLTransformStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    messages = storage.GetUserMessages()
    texts = [messages.GetNthMessageText(i) for i in range(messages.GetNumberOfMessages())]
    if intent == 1006:
        assert texts == []
    else:  # Slicer accepts the vector intent but warns
        assert any("1006" in t for t in texts)
    from_parent = node.GetTransformFromParent()
    assert from_parent is not None and from_parent.GetClassName() == "vtkOrientedGridTransform"

    itk = sitk.DisplacementFieldTransform(sitk.Image(field))
    idx = np.random.default_rng(0).uniform(3, np.array(grid.shape) - 4, size=(20, 3))
    lps = grid.index_to_physical(idx)
    expected = np.array([itk.TransformPoint(p.tolist()) for p in lps])
    assert np.linalg.norm(expected - lps, axis=1).min() > 0.5  # a real displacement, not the identity
    slicer_ras = np.array([from_parent.TransformPoint(*sp.lps_to_ras(p)) for p in lps])
    # Slicer interpolates the grid cubically, ITK linearly: they agree to a few micrometres on a smooth field
    np.testing.assert_allclose(sp.ras_to_lps(slicer_ras), expected, atol=0.02)


def test_real_files_pass_the_checks(shared_data):
    pair = shared_data / "brain" / "oasis_pair"
    img = tio.read_image(pair / "image_A_160x192x144.nii.gz", role="fixed image")
    assert img.GetSize() == (160, 192, 144) and img.GetPixelID() == sitk.sitkFloat32
    labels = tio.read_label_map(pair / "image_A_160x192x144_seg.nii.gz", role="fixed label map")
    assert set(np.unique(sitk.GetArrayViewFromImage(labels))) == {0, 1, 2}
    ct = tio.read_image(shared_data / "abdomen" / "ct_example.nii.gz")
    assert float(sitk.GetArrayViewFromImage(ct).min()) < -900  # HU kept, not rescaled
    ct_labels = tio.read_label_map(shared_data / "abdomen" / "ct_example_labels.nii.gz", ct)
    assert ct_labels.GetSize() == ct.GetSize()
    with pytest.raises(InputError, match=r"not on the voxel grid of the image: size \(160, 192, 144\) vs "
                                         r"\(122, 101, 112\)"):
        tio.read_label_map(pair / "image_B_160x192x144_seg.nii.gz", ct)


# ------------------------------------------------------------------------------------------- issue 12: validation
def test_special_files_are_refused_before_they_are_opened(tmp_path):
    fifo = tmp_path / "pipe.nii.gz"
    os.mkfifo(fifo)
    assert tio.special_file_kind(fifo) == "a named pipe (FIFO)"
    assert tio.special_file_kind(tmp_path) == "a folder"
    with pytest.raises(InputError, match=r"moving image: .*pipe\.nii\.gz' is a named pipe \(FIFO\).*Fix"):
        tio.read_image(fifo, role="moving image")  # returns at once: opening it would block
    with pytest.raises(InputError, match="named pipe"):
        tio.read_label_map(fifo)
    with pytest.raises(InputError, match="named pipe"):
        tio.read_transform(fifo)
    with pytest.raises(InputError, match="is a folder"):
        tio.read_transform(tmp_path)
    with pytest.raises(InputError, match="the path is empty"):
        tio.read_image("")  # not the current folder


def test_truncated_nifti_label_maps_are_refused_like_images(tmp_path):
    labels = np.zeros((20, 18, 16), np.uint8)
    labels[3:15, 4:12, 2:14] = 6
    full = tmp_path / "full.nii.gz"
    sitk.WriteImage(image(labels), str(full))
    data = full.read_bytes()
    for name, payload in (("cut.nii.gz", data[: len(data) * 9 // 10]),
                          ("cut.nii", gzip.decompress(data)[:-500])):
        (tmp_path / name).write_bytes(payload)
        # ITK alone reads it without a word (the missing voxels become 0)
        assert sitk.ReadImage(str(tmp_path / name)).GetSize() == (20, 18, 16)
        with pytest.raises(InputError, match=r"fixed label map: .*is truncated or damaged.*Fix: copy"):
            tio.read_label_map(tmp_path / name)
        with pytest.raises(InputError, match="truncated"):
            tio.read_image(tmp_path / name)


def test_truncated_metaimage_says_truncated(tmp_path):
    full = tmp_path / "full.mha"
    sitk.WriteImage(image(np.random.rand(20, 18, 16).astype(np.float32)), str(full), useCompression=True)
    (tmp_path / "cut.mha").write_bytes(full.read_bytes()[:3000])
    with pytest.raises(InputError) as e:
        tio.read_image(tmp_path / "cut.mha")
    assert "truncated or damaged" in str(e.value) and "No such file" not in str(e.value)


def test_zero_spacing_in_a_nifti_header_is_refused(tmp_path):
    nii = nib.Nifti1Image(np.random.rand(10, 10, 10).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    raw = tmp_path / "a.nii"
    nib.save(nii, raw)
    data = bytearray(raw.read_bytes())
    data[84:88] = np.float32(0.0).tobytes()  # pixdim[2]
    (tmp_path / "zero.nii").write_bytes(bytes(data))
    assert sitk.ReadImage(str(tmp_path / "zero.nii")).GetSpacing()[1] != 0  # ITK quietly invents a spacing
    with pytest.raises(InputError, match=r"pixdim\) \(2, 0, 2\) mm: 0 is not a spacing.*Fix"):
        tio.read_image(tmp_path / "zero.nii")


@pytest.mark.parametrize("spacing, direction, words", [
    ((1e6, 1.0, 1.0), None, ["not physical", "0.001 to 100 mm", "Fix"]),
    ((1e-6, 1.0, 1.0), None, ["not physical", "millimetres"]),
    ((1.0, 1.0, 1.0), (1, 0.5, 0, 0, 1, 0, 0, 0, 1), ["sheared", "(1, 0.5, 0, 0, 1, 0, 0, 0, 1)", "Fix: resample"]),
    ((1.0, 1.0, 1.0), (2, 0, 0, 0, 1, 0, 0, 0, 1), ["column lengths 2, 1, 1", "rotation"]),
])
def test_non_physical_geometry_is_refused(tmp_path, spacing, direction, words):
    img = image(np.random.rand(10, 10, 10).astype(np.float32), spacing=spacing)
    if direction is not None:
        img.SetDirection(direction)
    path = tmp_path / "g.mha"
    sitk.WriteImage(img, str(path))
    with pytest.raises(InputError) as e:
        tio.read_image(path)
    for word in words:
        assert word in str(e.value)
    with pytest.raises(InputError):
        tio.check_geometry(img, "the fixed image")  # the same check for images that never were files
    tio.check_geometry(image(np.zeros((4, 4, 4)), direction=oblique_direction()), "a rotated image")


def test_nearly_empty_image_is_refused(tmp_path):
    arr = np.zeros((20, 20, 20), np.float32)
    arr[3, 4, 5] = 100.0
    path = tmp_path / "one.nii.gz"
    sitk.WriteImage(image(arr), str(path))
    with pytest.raises(InputError, match=r"moving image: .*nearly empty: only 1 of 8000 voxels.*Fix"):
        tio.read_image(path, role="moving image")
    arr[:5] = 50.0  # a real structure: accepted
    sitk.WriteImage(image(arr), str(path))
    assert tio.read_image(path).GetSize() == (20, 20, 20)


def test_grid_mismatch_prints_plain_numbers():
    a = image(np.zeros((4, 4, 4)))
    b = image(np.zeros((4, 4, 4)), spacing=(2.0, 1.5, 2.0), origin=(12.5, -20.0, 30.0))
    text = "; ".join(grid_mismatch(a, b))
    assert "spacing (2, 1.5, 2) vs (1, 1.5, 2) mm" in text and "origin (12.5, -20, 30)" in text
    assert "np." not in text


# ------------------------------------------------------------------------------------------- inputs and manifests
def test_same_file_sees_links(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("x")
    os.link(a, tmp_path / "hard.txt")
    os.symlink(a, tmp_path / "soft.txt")
    (tmp_path / "copy.txt").write_text("x")
    assert tio.same_file(a, tmp_path / "hard.txt") and tio.same_file(a, tmp_path / "soft.txt")
    (tmp_path / "sub").mkdir()
    assert tio.same_file(a, tmp_path / "sub" / ".." / "a.txt")
    assert not tio.same_file(a, tmp_path / "copy.txt") and not tio.same_file(a, tmp_path / "missing.txt")


def test_output_folder_never_replaces_an_input(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    moving = out / "warped.nii.gz"
    moving.write_text("the moving image")
    elsewhere = tmp_path / "labels.nii.gz"
    elsewhere.write_text("labels")
    os.link(elsewhere, out / "jacobian.nii.gz")
    for inputs, words in (({"moving image": moving}, "is the moving image"),
                          ({"moving label map": elsewhere}, "through a link")):
        with pytest.raises(OutputError) as e:
            with tio.OutputFolder(out, overwrite=True, names=["warped.nii.gz", "jacobian.nii.gz"], inputs=inputs):
                raise AssertionError("the block must not run")
        assert words in str(e.value) and "Fix: choose another output folder" in str(e.value)
    assert moving.read_text() == "the moving image" and elsewhere.read_text() == "labels"
    # an undeclared name is checked when first used
    with pytest.raises(OutputError, match="is the moving image"):
        with tio.OutputFolder(out, overwrite=True, inputs={"moving image": moving}) as folder:
            folder.write_text("warped.nii.gz", "x")
    assert moving.read_text() == "the moving image"


def test_manifest_replaces_the_previous_run_as_a_whole(tmp_path):
    out = tmp_path / "out"
    with tio.OutputFolder(out, names=["a.txt", "old.txt"], manifest=tio.MANIFEST_NAME) as folder:
        folder.write_text("a.txt", "1")
        folder.write_text("old.txt", "1")
    assert listing(out) == ["a.txt", "old.txt", tio.MANIFEST_NAME]
    # without overwrite, the previous run is refused even when no name clashes
    with pytest.raises(OutputError, match="previous run.*--overwrite"):
        with tio.OutputFolder(out, names=["b.txt"], manifest=tio.MANIFEST_NAME):
            pass
    # a failing new run changes nothing
    with pytest.raises(RuntimeError):
        with tio.OutputFolder(out, overwrite=True, names=["a.txt"], manifest=tio.MANIFEST_NAME) as folder:
            folder.write_text("a.txt", "2")
            raise RuntimeError("registration failed")
    assert listing(out) == ["a.txt", "old.txt", tio.MANIFEST_NAME] and (out / "a.txt").read_text() == "1"
    # a successful one replaces a.txt and removes old.txt, after the new files are in place
    (out / "user_notes.txt").write_text("not ours")
    with tio.OutputFolder(out, overwrite=True, names=["a.txt"], manifest=tio.MANIFEST_NAME) as folder:
        folder.write_text("a.txt", "2")
        assert (out / "old.txt").exists()
    assert listing(out) == ["a.txt", tio.MANIFEST_NAME, "user_notes.txt"]
    assert [p.name for p in folder.removed] == ["old.txt"]
    import json

    assert json.loads((out / tio.MANIFEST_NAME).read_text())["files"] == ["a.txt", tio.MANIFEST_NAME]


def test_a_damaged_manifest_cannot_remove_files_outside(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "precious.txt").write_text("keep")
    (out / tio.MANIFEST_NAME).write_text('{"files": ["../precious.txt", "/etc/hostname", "stale.txt"]}')
    (out / "stale.txt").write_text("old")
    with tio.OutputFolder(out, overwrite=True, names=["new.txt"], manifest=tio.MANIFEST_NAME) as folder:
        folder.write_text("new.txt", "n")
    assert (tmp_path / "precious.txt").read_text() == "keep"
    assert listing(out) == ["new.txt", tio.MANIFEST_NAME]


def test_a_run_that_writes_nothing_removes_the_previous_one_and_its_folder(tmp_path):
    out = tmp_path / "learn2reg"
    with tio.OutputFolder(out, names=["disp_0001_0002.npz"], manifest=tio.MANIFEST_NAME) as folder:
        folder.write_bytes("disp_0001_0002.npz", b"x")
    with tio.OutputFolder(out, overwrite=True, manifest=tio.MANIFEST_NAME):
        pass
    assert not out.exists()


def test_without_a_manifest_the_known_names_are_the_previous_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "qc.png").write_text("old figure")
    (out / "mine.txt").write_text("user file")
    with tio.OutputFolder(out, overwrite=True, names=["report.json"], manifest=tio.MANIFEST_NAME,
                          known_names=["report.json", "qc.png"]) as folder:
        folder.write_text("report.json", "{}")
    assert listing(out) == ["mine.txt", "report.json", tio.MANIFEST_NAME]
