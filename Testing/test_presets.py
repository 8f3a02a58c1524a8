"""Presets as labelling schemes and prompt sets.

TotalSegmentator interoperability: its label values and names map onto the model's regions, and a label map read
with the wrong labelling scheme is refused instead of giving a wrong registration without a word. Presets the model
in use cannot serve (brain MRI with the bundled abdomen model) say what to run instead."""
import json
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from textscf import presets
from textscf.errors import InputError
from textscf.segmentation import LabelMapSegmentor, check_label_scheme

# From the issue and TotalSegmentator's class map (v2 'total' task).
TOTALSEGMENTATOR_V2 = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach",
                       7: "pancreas", 8: "adrenal_gland_right", 9: "adrenal_gland_left", 10: "lung_upper_lobe_left",
                       15: "esophagus", 18: "small_bowel", 20: "colon", 27: "vertebrae_L5", 52: "aorta",
                       63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein", 117: "costal_cartilages"}


def test_totalsegmentator_preset_holds_its_v2_label_table():
    preset = presets.load_preset("totalsegmentator")
    for value, name in TOTALSEGMENTATOR_V2.items():
        assert preset.label_names[value] == name
    assert len(preset.label_names) == 117
    value_of = dict(zip(preset.region_names, preset.label_values))
    assert value_of == {"spleen": 1, "right kidney": 2, "left kidney": 3, "gall bladder": 4, "esophagus": 15,
                        "liver": 5, "stomach": 6, "aorta": 52, "inferior vena cava": 63,
                        "portal and splenic vein": 64, "pancreas": 7, "right adrenal gland": 8,
                        "left adrenal gland": 9}
    # Same region names as the bundled model's preset: the one-hot model knows every one of them.
    assert preset.region_names == presets.load_preset("abdomen-ct").region_names
    # Every other TotalSegmentator class is background, none of the regions is.
    assert set(preset.background_labels) == set(range(1, 118)) - set(preset.label_values)


@pytest.mark.data
def test_totalsegmentator_preset_agrees_with_the_example_label_map_names(shared_data):
    names = json.loads((shared_data / "abdomen" / "ct_example_labels.json").read_text(encoding="utf-8"))
    preset = presets.load_preset("totalsegmentator")
    assert {int(v): n for v, n in names.items()} == {int(v): preset.label_names[int(v)] for v in names}


def test_totalsegmentator_names_resolve_to_the_regions():
    assert presets.canonical_region_name("kidney_right") == "right kidney"
    assert presets.canonical_region_name("portal_vein_and_splenic_vein") == "portal and splenic vein"
    assert presets.canonical_region_name("gallbladder") == "gall bladder"
    assert presets.canonical_region_name("adrenal_gland_left") == "left adrenal gland"
    assert presets.canonical_region_name("Left-Hippocampus") == "left hippocampus"  # FreeSurfer names too
    assert presets.canonical_region_name(" lung ") == "lung"  # unknown names stay as they are
    assert presets.same_region("Kidney_Right", "right kidney")
    assert not presets.same_region("kidney_right", "left kidney")
    rows, unknown = presets.model_rows(["spleen", "right kidney", "liver"], ["liver", "kidney_right", "lung"])
    assert rows == [3, 2] and unknown == ["lung"]


def test_totalsegmentator_to_btcv_comes_from_the_presets():
    assert presets.totalsegmentator_to_btcv() == {
        "spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "esophagus": 5, "liver": 6, "stomach": 7,
        "aorta": 8, "inferior_vena_cava": 9, "portal_vein_and_splenic_vein": 10, "pancreas": 11,
        "adrenal_gland_right": 12, "adrenal_gland_left": 13}


# ------------------------------------------------------------------------------------------------------------------
# A planted TotalSegmentator-style label map: organ-sized blocks at 2 mm (0.008 mL per voxel)


def _block(array, value, start, size):
    i, j, k = start
    a, b, c = size
    array[k:k + c, j:j + b, i:i + a] = value


def planted_totalsegmentator_map(extra_classes=True):
    array = np.zeros((120, 110, 130), np.uint8)  # [k, j, i]
    _block(array, 5, (5, 5, 5), (60, 55, 45))       # liver: 148,500 voxels = 1188 mL
    _block(array, 1, (80, 10, 10), (30, 30, 25))    # spleen 180 mL
    _block(array, 2, (10, 70, 60), (15, 15, 30))    # kidney right
    _block(array, 3, (100, 70, 60), (15, 15, 30))   # kidney left
    _block(array, 6, (70, 50, 10), (30, 25, 25))    # stomach
    _block(array, 7, (50, 62, 55), (25, 8, 8))      # pancreas
    _block(array, 52, (62, 85, 5), (6, 6, 100))     # aorta
    _block(array, 63, (52, 85, 5), (6, 6, 100))     # inferior vena cava
    _block(array, 64, (45, 60, 40), (20, 4, 4))     # portal and splenic vein
    if extra_classes:
        _block(array, 18, (40, 20, 80), (30, 30, 20))   # small bowel
        _block(array, 20, (20, 20, 100), (80, 10, 10))  # colon
        _block(array, 27, (55, 95, 100), (15, 12, 10))  # vertebra L5
        _block(array, 117, (30, 5, 30), (50, 3, 5))     # costal cartilages
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 2.0))
    return image


@pytest.mark.parametrize("unmapped", ["error", "background"])
def test_totalsegmentator_map_read_with_btcv_values_is_refused(unmapped):
    btcv = presets.load_preset("abdomen-ct")
    with pytest.raises(InputError) as info:
        LabelMapSegmentor(planted_totalsegmentator_map(), btcv.label_values, btcv.region_names, unmapped)
    message = str(info.value)
    assert "'esophagus'" in message and "mL" in message  # BTCV's 5 would be TotalSegmentator's liver
    assert "--preset totalsegmentator" in message and "5 (liver)" in message


def test_organ_subset_without_other_classes_is_refused_by_anatomy():
    """TotalSegmentator run on a few organs only: every value is a BTCV value too; the volumes give it away."""
    btcv = presets.load_preset("abdomen-ct")
    with pytest.raises(InputError, match="label 5 read as 'esophagus' covers 1188 mL"):
        LabelMapSegmentor(planted_totalsegmentator_map(extra_classes=False), btcv.label_values, btcv.region_names)


def _without_background_labels(image, preset):
    array = sitk.GetArrayFromImage(image)
    out = sitk.GetImageFromArray(np.where(np.isin(array, preset.background_labels), 0, array))
    out.CopyInformation(image)
    return out


def test_totalsegmentator_preset_maps_liver_to_liver():
    preset = presets.load_preset("totalsegmentator")
    label_map = planted_totalsegmentator_map()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        segmentor = LabelMapSegmentor(_without_background_labels(label_map, preset), preset.label_values,
                                      preset.region_names)
    assert [str(w.message) for w in caught] == [
        "these regions have no voxels in the label map: 'gall bladder' (label 4), 'esophagus' (label 15), "
        "'right adrenal gland' (label 8), 'left adrenal gland' (label 9). They will not guide the registration."]
    seg = segmentor.predict(label_map)
    raw = sitk.GetArrayFromImage(label_map).transpose(2, 1, 0)
    regions = seg.regions_array()
    for region, value in (("liver", 5), ("aorta", 52), ("inferior vena cava", 63), ("stomach", 6)):
        np.testing.assert_array_equal(regions == seg.region_names.index(region), raw == value)


def test_own_prompts_with_totalsegmentator_values_are_accepted():
    """Naming the values right (liver = 5) is accepted even with the other classes mapped to background."""
    segmentor = LabelMapSegmentor(planted_totalsegmentator_map(), [5, 1, 52], ["liver", "spleen", "aorta"],
                                  unmapped="background")
    assert segmentor.region_names == ["background", "liver", "spleen", "aorta"]


def test_btcv_label_map_with_the_btcv_preset_is_accepted():
    from textscf.phantom import make_example_pair

    pair = make_example_pair()
    btcv = presets.load_preset("abdomen-ct")
    for key in ("fixed_labels", "moving_labels"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            LabelMapSegmentor(pair[key], btcv.label_values, btcv.region_names)


def test_scheme_check_is_silent_for_unknown_schemes_and_plausible_volumes():
    # Values no bundled scheme explains (a dataset of its own): only the usual unmapped-label handling applies.
    check_label_scheme({1: 100.0, 300: 5.0, 301: 5.0, 302: 5.0}, [1], ["liver"])
    # Names without an anatomy entry are never judged by volume.
    check_label_scheme({1: 1e6}, [1], ["whole body"])


@pytest.mark.data
def test_example_totalsegmentator_map_through_the_engine(shared_data):
    """The real TotalSegmentator label map, as `textscf register --preset totalsegmentator` reads it."""
    from textscf.pipeline import RegistrationOptions, resolve_prompts, segment_fixed

    folder = shared_data / "abdomen"
    image = sitk.ReadImage(str(folder / "ct_example.nii.gz"))
    label_map = sitk.ReadImage(str(folder / "ct_example_labels.nii.gz"))
    raw = sitk.GetArrayFromImage(label_map).transpose(2, 1, 0)

    options = RegistrationOptions(preset="totalsegmentator")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # esophagus is not in this map
        seg = segment_fixed(image, label_map, resolve_prompts(None, options), options, device=None)
    regions = seg.regions_array()
    for region, ts_name in (("liver", "liver"), ("stomach", "stomach"), ("aorta", "aorta"),
                            ("portal and splenic vein", "portal_vein_and_splenic_vein")):
        value = {n: int(v) for v, n in json.loads((folder / "ct_example_labels.json").read_text(encoding="utf-8")).items()}[ts_name]
        np.testing.assert_array_equal(regions == seg.region_names.index(region), raw == value)

    options = RegistrationOptions(preset="abdomen-ct", unmapped_labels="background")
    with pytest.raises(InputError, match="--preset totalsegmentator"):
        segment_fixed(image, label_map, resolve_prompts(None, options), options, device=None)


@pytest.mark.data
def test_cli_register_with_the_totalsegmentator_preset(shared_data, tmp_path, tiny_abdomen_checkpoint, capsys):
    from textscf.cli import main

    folder = shared_data / "abdomen"
    ct, labels = str(folder / "ct_example.nii.gz"), str(folder / "ct_example_labels.nii.gz")
    # The fixed label map is TotalSegmentator's file itself (with its label-table header extension); the moving
    # scan is the same CT and labels 6 mm further along the first axis, rewritten by SimpleITK without the extension:
    # there only the values tell the scheme.
    moving = {}
    for key, path in (("image", ct), ("labels", labels)):
        image = sitk.ReadImage(path)
        image.SetOrigin(tuple(np.add(image.GetOrigin(), (6.0, 0.0, 0.0))))
        moving[key] = str(tmp_path / f"moving_{key}.nii.gz")
        sitk.WriteImage(image, moving[key])
    common = [ct, moving["image"], "--fixed-labels", labels, "--moving-labels", moving["labels"], "--checkpoint",
              str(tiny_abdomen_checkpoint), "--device", "cpu", "--init", "none", "--no-qc", "--quiet"]

    assert main(["register", *common, "-o", str(tmp_path / "btcv"), "--preset", "abdomen-ct",
                 "--unmapped-labels", "background"]) == 2
    err = capsys.readouterr().err
    assert "'esophagus' covers" in err and "--preset totalsegmentator" in err
    assert not (tmp_path / "btcv").exists() or not any((tmp_path / "btcv").iterdir())

    assert main(["register", *common, "-o", str(tmp_path / "ts"), "--preset", "totalsegmentator"]) == 0
    report = json.loads((tmp_path / "ts" / "report.json").read_text(encoding="utf-8"))
    stats = report.get("stats", report)
    # The liver's own voxels (value 5) on both sides, 6 mm apart; read as BTCV's esophagus, "liver" would be the
    # stomach (6) instead, and the aorta (52) would be ignored.
    assert 0.8 < stats["dice_before"]["liver"] < 1.0
    assert stats["dice_before"]["aorta"] > 0.2
    assert set(stats["dice_before"]) >= {"liver", "spleen", "aorta", "inferior vena cava", "pancreas"}


# ------------------------------------------------------------------------------------------------------------------
# Presets the model in use does not know


def test_cli_brain_preset_with_the_bundled_model_says_what_works(tmp_path, capsys):
    from textscf.cli import main

    rng = np.random.default_rng(0)
    paths = []
    for name in ("fixed", "moving"):
        image = sitk.GetImageFromArray(rng.normal(100.0, 20.0, (24, 28, 32)).astype(np.float32))
        image.SetSpacing((1.0, 1.0, 1.0))
        paths.append(str(tmp_path / f"{name}.nii.gz"))
        sitk.WriteImage(image, paths[-1])
    labels = sitk.GetImageFromArray(np.full((24, 28, 32), 17, np.int16))  # Left-Hippocampus everywhere
    labels.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    # the bundled one-hot CT model, named explicitly, cannot take the brain regions: the message says what works
    # (without --checkpoint the default schedule picks a fresh network for MRI by itself)
    from textscf.presets import bundled_model_path

    assert main(["register", *paths, "-o", str(tmp_path / "out"), "--preset", "brain-mri", "--device", "cpu",
                 "--checkpoint", str(bundled_model_path()), "--fixed-labels", str(tmp_path / "labels.nii.gz"),
                 "--quiet", "--no-qc"]) == 2
    err = capsys.readouterr().err
    assert "knows only 13 regions" in err and "--checkpoint fresh --refine 150" in err
