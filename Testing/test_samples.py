"""Slicer sample CTs: cached, checksum-verified download (file:// URLs only, never the internet), the known-field
pair, and `textscf demo --sample` end to end on a small local stand-in for CTLiver."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json

import numpy as np
import pytest
import SimpleITK as sitk

from textscf import samples
from textscf.cli import EXIT_INPUT, EXIT_OK, main
from textscf.errors import CheckpointError, InputError
from textscf.samples import SLICER_SAMPLES, fetch_sample, make_sample_pair

DIRECTION = (0.0, -1.0, 0.0, 0.8, 0.0, -0.6, 0.6, 0.0, 0.8)  # a rotation, not only axis flips


def _synthetic_ct(size=(24, 20, 10), spacing=(1.0, 1.0, 2.5), origin=(-12.0, 30.0, -50.0)) -> sitk.Image:
    """An int16 CT-like volume (HU): air, an elliptic body, a bright organ and a bone bar; sizes are (I, J, K)."""
    idx = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in size), indexing="ij"))
    arr = np.full(size, -1000, np.int16)
    arr[(idx[0] / 0.85) ** 2 + (idx[1] / 0.75) ** 2 < 1] = 40
    arr[(idx[0] - 0.3) ** 2 + (idx[1] + 0.1) ** 2 + (idx[2] / 2) ** 2 < 0.12] = 120
    arr[(np.abs(idx[0]) < 0.12) & (np.abs(idx[1] + 0.55) < 0.12)] = 600
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(DIRECTION)
    return image


def _sample_file(tmp_path, name="source.nrrd", **kwargs):
    path = tmp_path / "remote" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(_synthetic_ct(**kwargs), str(path))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def local_ctliver(tmp_path, monkeypatch):
    """The CTLiver registry entry pointed at a small local NRRD (file:// URL, its own SHA-256)."""
    path, digest = _sample_file(tmp_path)
    entry = dataclasses.replace(SLICER_SAMPLES["CTLiver"], url=path.as_uri(), sha256=digest)
    monkeypatch.setitem(SLICER_SAMPLES, "CTLiver", entry)
    monkeypatch.setenv("TEXTSCF_CACHE", str(tmp_path / "default-cache"))
    return path, digest


def test_registry_entry_is_slicers_ctliver():
    entry = SLICER_SAMPLES["CTLiver"]
    assert entry.file_name == "CTLiver.nrrd"
    assert entry.url.endswith("/SHA256/" + entry.sha256) and len(entry.sha256) == 64
    assert entry.licence == "CC BY-SA 4.0" and "liver_100" in entry.description


def test_fetch_downloads_once_into_cache(local_ctliver, tmp_path):
    source, digest = local_ctliver
    logged = []
    path = fetch_sample("CTLiver", cache_dir=tmp_path / "cache", log=logged.append)
    assert path == tmp_path / "cache" / "CTLiver.nrrd"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert len(logged) == 1 and source.as_uri() in logged[0]
    assert sorted(p.name for p in path.parent.iterdir()) == ["CTLiver.nrrd"]  # no temporary file left
    source.unlink()  # a second call must not download again
    assert fetch_sample("CTLiver", cache_dir=tmp_path / "cache", log=logged.append) == path
    assert len(logged) == 1


def test_fetch_default_cache_is_textscf_cache_samples(local_ctliver, tmp_path):
    path = fetch_sample("CTLiver")
    assert path == tmp_path / "default-cache" / "samples" / "CTLiver.nrrd"
    assert path.is_file()


def test_fetch_replaces_corrupt_cached_file(local_ctliver, tmp_path):
    _, digest = local_ctliver
    cached = tmp_path / "cache" / "CTLiver.nrrd"
    cached.parent.mkdir()
    cached.write_bytes(b"truncated")
    assert fetch_sample("CTLiver", cache_dir=cached.parent) == cached
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == digest


def test_fetch_wrong_checksum_leaves_nothing(local_ctliver, tmp_path, monkeypatch):
    source, _ = local_ctliver
    monkeypatch.setitem(SLICER_SAMPLES, "CTLiver", dataclasses.replace(SLICER_SAMPLES["CTLiver"], sha256="0" * 64))
    cache = tmp_path / "cache"
    with pytest.raises(InputError, match="SHA-256") as info:
        fetch_sample("CTLiver", cache_dir=cache)
    assert source.as_uri() in str(info.value) and "Fix:" in str(info.value)
    assert list(cache.iterdir()) == []


def test_fetch_unreachable_url_names_url_and_fix(tmp_path):
    cache = tmp_path / "cache"
    url = "file:///nonexistent/textscf-test/CTLiver.nrrd"
    with pytest.raises(InputError) as info:
        fetch_sample("CTLiver", cache_dir=cache, url=url)
    message = str(info.value)
    assert url in message
    assert "check the internet connection" in message
    assert str(cache / "CTLiver.nrrd") in message  # where to place a copy made elsewhere
    assert "without --sample" in message
    assert list(cache.iterdir()) == []


def test_fetch_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    class Interrupted(io.BytesIO):
        def read(self, n=-1):
            if self.tell():
                raise KeyboardInterrupt
            return super().read(4)

    monkeypatch.setattr(samples.urllib.request, "urlopen", lambda url, timeout: Interrupted(b"partial data"))
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        fetch_sample("CTLiver", cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_unknown_sample_lists_known_ones(tmp_path):
    with pytest.raises(InputError, match="unknown sample 'CTLung'.*CTLiver"):
        fetch_sample("CTLung", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_make_sample_pair_geometry_and_known_field():
    ct = _synthetic_ct()
    pair = make_sample_pair(ct, seed=1, spacing_mm=2.0, max_displacement_mm=5.0, smoothness_mm=20.0)
    fixed, moving, u = pair["fixed"], pair["moving"], pair["displacement"]
    for image in (fixed, moving):
        assert image.GetSpacing() == (2.0, 2.0, 2.0)
        assert image.GetPixelID() == sitk.sitkFloat32
        assert np.allclose(image.GetDirection(), DIRECTION)
    # 2x2x1 bins give 12 x 10 x 10 voxels of 2 x 2 x 2.5 mm: an extent of 22 x 18 x 22.5 mm
    assert moving.GetSize() == fixed.GetSize() == (12, 10, 12)
    assert np.allclose(fixed.GetOrigin(), moving.GetOrigin())
    assert u.shape == (3, 12, 10, 12) and u.dtype == np.float32
    lengths = np.linalg.norm(u * 2.0, axis=0)
    assert lengths.max() == pytest.approx(5.0, rel=1e-4)
    m, f = sitk.GetArrayFromImage(moving), sitk.GetArrayFromImage(fixed)
    assert m.min() >= -1000 and m.max() <= 600 and m.max() > 100  # linear resampling keeps the HU range
    assert np.abs(f - m).max() > 100  # the known field moved the organs
    assert not np.array_equal(make_sample_pair(ct, seed=2)["displacement"], make_sample_pair(ct, seed=1)["displacement"])


def _swin_weights(path) -> str:
    """A random-init tiny SwinUNETR (feature size 12) for background + the 13 abdomen organs."""
    import torch
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    torch.save(SwinUNETR(in_channels=1, out_channels=14, feature_size=12).state_dict(), path)
    return str(path)


def test_demo_sample_end_to_end(tmp_path, monkeypatch, capsys):
    source, digest = _sample_file(tmp_path, size=(48, 48, 24), spacing=(1.5, 1.5, 3.0))
    monkeypatch.setitem(SLICER_SAMPLES, "CTLiver",
                        dataclasses.replace(SLICER_SAMPLES["CTLiver"], url=source.as_uri(), sha256=digest))
    out, cache = tmp_path / "out", tmp_path / "cache"
    code = main(["demo", "--sample", "CTLiver", "--segmentor-weights", _swin_weights(tmp_path / "swin.pt"),
                 "--segmentor-feature-size", "12", "--cache-dir", str(cache), "--refine", "0", "--device", "cpu",
                 "-o", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["displacement.nii.gz", "warped.nii.gz", "jacobian.nii.gz", "report.json", "initial_transform.tfm", "qc.png",
         "textscf-manifest.json"])
    assert (cache / "samples" / "CTLiver.nrrd").is_file()
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["inputs"]["licence"] == "CC BY-SA 4.0"
    assert report["inputs"]["sample_file"] == str(cache / "samples" / "CTLiver.nrrd")
    assert 0 < report["mean_endpoint_error_mm_before"] <= 8.0
    assert np.isfinite(report["mean_endpoint_error_mm"])
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    assert warped.GetSpacing() == pytest.approx((2.0, 2.0, 2.0))
    assert "endpoint error" in captured.out and "CC BY-SA 4.0" in captured.out


def test_demo_sample_without_segmentor_weights_explains_the_fix(tmp_path, monkeypatch, capsys, local_ctliver):
    from textscf import segmentation

    def offline(destination, sha256=None):
        raise CheckpointError("could not download the MONAI bundle: no network")

    monkeypatch.setattr(segmentation, "download_btcv_bundle", offline)
    out = tmp_path / "out"
    code = main(["demo", "--sample", "CTLiver", "--cache-dir", str(tmp_path / "cache"), "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT
    assert "no organ label map" in err and "--segmentor-weights" in err and "without --sample" in err
    assert str(tmp_path / "cache" / "models" / segmentation.BTCV_BUNDLE_NAME) in err
    assert not out.exists()


@pytest.mark.parametrize("extra", [["--segmentor-weights", "w.pt"], ["--cache-dir", "c"],
                                   ["--segmentor-feature-size", "12"]])
def test_demo_sample_options_need_sample(tmp_path, capsys, extra):
    assert main(["demo", "-o", str(tmp_path / "out"), *extra]) == EXIT_INPUT
    assert "only apply with --sample" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_demo_rejects_unknown_sample(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--sample", "CTLung"])
    assert info.value.code == 2 and "CTLiver" in capsys.readouterr().err
