"""DIR-Lab loader and preprocessing: DIR-Lab-format files written here, and the real landmarks."""

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from adreg_jax.data import dirlab

REAL = Path(__file__).resolve().parents[1].parent / "shared/data/dirlab"


def _write_case(root: Path, case: int, fixed_xyz, moving_xyz, image_bytes=None):
    folder = root / ("Case8Deploy" if case == 8 else f"Case{case}Pack")
    (folder / "ExtremePhases").mkdir(parents=True)
    (folder / "Images").mkdir()
    for phase, xyz in (("T00", fixed_xyz), ("T50", moving_xyz)):
        # the real files' quirks: leading spaces, tabs, trailing tab, CRLF
        text = "".join(f" {x}\t {y}\t {z}\t\r\n" for x, y, z in xyz)
        (folder / "ExtremePhases" / f"case{case}_dirLab300_{phase}_xyz.txt").write_text(text)
    shape = dirlab.case_shape(case)
    for phase in dirlab.PHASES:
        volume = np.full(shape, -1000, "<i2")
        volume[shape[0] // 2, 10, 20] = 400 + int(phase[1:])
        data = volume.tobytes() if image_bytes is None else image_bytes
        (folder / "Images" / dirlab.image_path(root, case, phase).name).write_bytes(data)
    return folder


def test_load_case_axes_and_1_based(tmp_path):
    _write_case(tmp_path, 1, [(21, 11, 48)], [(22, 11, 48)])
    data = dirlab.load_dirlab_case(tmp_path, 1)
    assert data.fixed.shape == (94, 256, 256)
    # bright voxel written at z y x = (47, 10, 20) is 1-based x y z = (21, 11, 48)
    np.testing.assert_allclose(data.fixed_points, [[47, 10, 20]])
    assert data.fixed[47, 10, 20] == 400
    assert dirlab.read_image(tmp_path, 1, "T90")[47, 10, 20] == 490
    np.testing.assert_allclose(data.spacing, [2.5, 0.97, 0.97])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(inplane_size=(200, 300), z_multiple=16),
        dict(isotropic_mm=2.0),
        dict(inplane_size=(128, 128), shape=(64, 96, 96)),
    ],
)
def test_landmarks_follow_preprocessing(tmp_path, kwargs):
    _write_case(tmp_path, 1, [(21, 11, 48), (130, 140, 40)], [(25, 12, 50), (128, 141, 44)])
    raw = dirlab.load_dirlab_case(tmp_path, 1)
    before = dirlab.tre_mm(raw.fixed_points, raw.moving_points, raw.grid_map, raw.spacing)
    out = dirlab.preprocess_case(raw, **kwargs)
    assert out.fixed.min() >= 0 and out.fixed.max() <= 1
    after = dirlab.tre_mm(out.fixed_points, out.moving_points, out.grid_map, out.original_spacing)
    np.testing.assert_allclose(after, before, atol=1e-4)
    # independent truth for the crop/pad and the z pad: the bright voxel moves with its landmark
    if "isotropic_mm" not in kwargs and "shape" not in kwargs:
        q = np.round(out.fixed_points[0]).astype(int)
        assert out.fixed[tuple(q)] == out.fixed.max()
        assert out.fixed.shape[0] % 16 == 0
    if "isotropic_mm" in kwargs:
        np.testing.assert_allclose(out.spacing, 2.0, rtol=0.02)


def test_bad_inputs(tmp_path):
    _write_case(tmp_path, 2, [(1, 1, 1)], [(1, 1, 1)], image_bytes=b"\0" * 10)
    with pytest.raises(ValueError, match=r"10 bytes, expected"):
        dirlab.load_dirlab_case(tmp_path, 2)
    with pytest.raises(FileNotFoundError, match="Case3Pack"):
        dirlab.load_dirlab_case(tmp_path, 3)
    _write_case(tmp_path, 4, [(1, 1, 500)], [(1, 1, 1)])
    with pytest.raises(ValueError, match="outside the volume"):
        dirlab.load_dirlab_case(tmp_path, 4, images=False)


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/dirlab not present")
@pytest.mark.parametrize("isotropic", [False, True])
def test_real_landmarks_published_before_tre(isotropic):
    for case, (_, _, published) in dirlab.CASES.items():
        data = dirlab.load_dirlab_case(REAL, case, images=False)
        assert data.fixed_points.shape == (300, 3)
        kwargs = dict(isotropic_mm=1.5) if isotropic else dict(inplane_size=(256, 256))
        out = dirlab.preprocess_case(data, **kwargs)
        tre = dirlab.tre_mm(out.fixed_points, out.moving_points, out.grid_map, out.original_spacing)
        assert abs(tre.mean() - published) < 0.01, (case, tre.mean(), published)


def _dirlab_data(root, **overrides):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "default_config", Path(__file__).resolve().parents[1] / "configs" / "default.py"
    )
    default = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(default)
    data = default.get_config().data
    data.update(dict(dataset="dirlab", root=str(root), test_case=1, max_points=32))
    data.update(overrides)
    return data


def test_dirlab_pipeline_pairs(tmp_path):
    from adreg_jax.data import pipeline

    data = _dirlab_data(tmp_path, image_size=(32, 64, 64), max_points=300)
    _write_case(tmp_path, 1, [(21, 11, 48), (130, 140, 40)], [(25, 12, 50), (128, 141, 44)])
    pair = pipeline.build_dataset(data, "test", seed=0)[0]
    assert pair["fixed"].shape == (32, 64, 64, 1) and pair["fixed_points"].shape == (300, 3)
    # by hand: the centred window holds 0-based z 31..62, y and x 96..159; the first pair (x 20)
    # is out and counted, the second (z y x 39 139 129 -> 43 140 127) stays real
    np.testing.assert_array_equal(np.flatnonzero(pair["points_mask"]), [1])
    assert pair["points_outside"] == 1 and int(pair["case"]) == 1
    np.testing.assert_allclose(pair["fixed_points"][1], [39 - 31, 139 - 96, 129 - 96])


# A small case 6 in DIR-Lab's raw format: (z, y, x) = (20, 40, 48) voxels of 5 x 4 x 4 mm, lungs
# (landmarks) off the volume's centre, to the right (x) and front (y).
SMALL = ((48, 40, 20), (4.0, 4.0, 5.0), 0.0)


def _small_case(root, monkeypatch, count=20):
    from adreg_jax.data.generated_lung import thorax_hu

    monkeypatch.setitem(dirlab.CASES, 6, SMALL)
    rng = np.random.default_rng(6)
    fixed = np.stack(
        [rng.integers(5, 15, count), rng.integers(6, 18, count), rng.integers(32, 43, count)], -1
    )
    moving = fixed + rng.integers(-1, 2, fixed.shape)
    shape, spacing = dirlab.case_shape(6), dirlab.case_spacing(6)
    images = {
        "T00": thorax_hu(shape, spacing, fixed, lung_margin_mm=10.0, seed=0),
        "T50": thorax_hu(shape, spacing, moving, lung_margin_mm=10.0, seed=1),
    }
    dirlab.write_case(root, 6, images, fixed, moving)
    # independent truth: TRE before straight from the 0-based (z, y, x) voxels and the spacing
    before = np.linalg.norm((moving - fixed) * np.asarray([5.0, 4.0, 4.0]), axis=-1)
    return fixed, moving, before


def test_raw_format_writer_round_trips(tmp_path, monkeypatch):
    fixed, moving, _ = _small_case(tmp_path, monkeypatch)
    text = (tmp_path / "Case6Pack/ExtremePhases/case6_dirLab300_T00_xyz.txt").read_bytes()
    first = f"{fixed[0, 2] + 1}\t{fixed[0, 1] + 1}\t{fixed[0, 0] + 1}\r\n".encode()
    assert text.startswith(first)  # 1-based x y z, tabs, CRLF
    data = dirlab.load_dirlab_case(tmp_path, 6)
    np.testing.assert_array_equal(data.moving_points, moving)
    raw = np.fromfile(tmp_path / "Case6Pack/Images/case6_T00.img", "<i2").reshape(20, 40, 48)
    np.testing.assert_array_equal(data.fixed, raw)


def test_lung_box_from_hu_holds_the_landmarks(tmp_path, monkeypatch):
    fixed, moving, _ = _small_case(tmp_path, monkeypatch)
    box = dirlab.find_lung_box(dirlab.load_dirlab_case(tmp_path, 6))
    points = np.concatenate([fixed, moving])
    # the lungs are the air within 10 mm of a landmark: at most 2 (z) / 3 (y, x) voxels beyond
    assert np.all(box[0] <= points.min(0)) and np.all(box[1] >= points.max(0))
    assert np.all(box[0] >= points.min(0) - [2, 3, 3]) and np.all(
        box[1] <= points.max(0) + [2, 3, 3]
    )
    # the couch (+300 HU) and the body (40 HU) are not lungs; a volume without air is an error
    data = dirlab.load_dirlab_case(tmp_path, 6)
    data.moving = np.zeros_like(data.moving)
    with pytest.raises(ValueError, match="no lungs found.*hu_offset"):
        dirlab.find_lung_box(data)


@pytest.mark.parametrize("center", ["lungs", "volume"])
def test_pipeline_keeps_or_counts_every_landmark(tmp_path, monkeypatch, center):
    from adreg_jax.data import pipeline
    from adreg_jax.evaluation import original_mm_tre

    fixed, moving, before = _small_case(tmp_path, monkeypatch)
    # resample to 8 mm in-plane, 5 mm in z: (20, 20, 24) -> a (16, 16, 16) grid
    data = _dirlab_data(tmp_path, test_case=6, image_size=(16, 16, 16), spacing_mm=(5.0, 8.0, 8.0))
    data.crop_center = center
    pair = pipeline.build_dataset(data, "test", seed=0)[0]
    mask, k = pair["points_mask"], len(fixed)
    assert pair["fixed"].shape == (16, 16, 16, 1) and not mask[k:].any()
    if center == "lungs":
        assert mask[:k].all() and pair["points_outside"] == 0
    else:
        # by hand: resampled (20, 20, 24), centred crop offsets (2, 2, 4); in-plane voxel
        # centres scale by 1/2 (q + 0.5 = (p + 0.5) / 2), so the grid holds raw z in [2, 17],
        # y in [4.5, 34.5], x in [8.5, 38.5]: the right-most landmarks fall out and are counted
        np.testing.assert_allclose(pair["fixed_points"][:k, 2], (fixed[:, 2] + 0.5) / 2 - 4.5)
        low, high = np.asarray([2.0, 4.5, 8.5]), np.asarray([17.0, 34.5, 38.5])
        inside = np.all((fixed >= low) & (fixed <= high) & (moving >= low) & (moving <= high), 1)
        assert 0 < inside.sum() < k
        np.testing.assert_array_equal(mask[:k], inside)
        assert pair["points_outside"] == k - inside.sum()
    # TRE before in the original mm through the preprocessing = the raw files' TRE
    zero = np.zeros((16, 16, 16, 3), np.float32)
    row = original_mm_tre(pair, zero)
    np.testing.assert_allclose(row["tre_mm_before"], before[mask[:k]].mean(), rtol=1e-5)
    # the images moved with the landmarks: the fixed image is lung (-850 HU -> 0.1) at them
    points = pair["fixed_points"][:k][mask[:k]]
    values = ndimage.map_coordinates(pair["fixed"][..., 0], points.T, order=1)
    assert abs(values.mean() - 0.1) < 0.05


def test_too_many_landmarks_is_an_error(tmp_path, monkeypatch):
    from adreg_jax.data import pipeline

    _small_case(tmp_path, monkeypatch)
    data = _dirlab_data(tmp_path, test_case=6, image_size=(16, 16, 16), max_points=8)
    with pytest.raises(ValueError, match="20 landmarks but config.data.max_points=8"):
        pipeline.build_dataset(data, "test", seed=0)[0]


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/dirlab not present")
def test_real_landmarks_fit_the_dirlab_config_grid():
    # configs/dirlab.py's grid and spacing on the real landmark files (no images here: the
    # landmarks' own bounding box stands in for the lungs' box that the images would give)
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "dirlab_config", Path(__file__).resolve().parents[1] / "configs" / "dirlab.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = module.get_config().data
    for case, (_, _, published) in dirlab.CASES.items():
        raw = dirlab.load_dirlab_case(REAL, case, images=False)
        points = np.concatenate([raw.fixed_points, raw.moving_points])
        out = dirlab.preprocess_case(
            raw,
            spacing_mm=tuple(data.spacing_mm),
            shape=tuple(data.image_size),
            center="lungs",
            lung_box=np.stack([points.min(0), points.max(0)]),
        )
        assert out.points_inside().sum() == 300, case
        tre = dirlab.tre_mm(out.fixed_points, out.moving_points, out.grid_map, out.original_spacing)
        assert abs(tre.mean() - published) < 0.01, (case, tre.mean(), published)
