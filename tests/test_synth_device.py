"""Synthesised brain pairs drawn on the device (adreg_jax.data.synth_device), on small grids:
the numpy generator's pairs in kind (keys, ranges, a true field that maps the labels, field sizes)
and a training stream that resumes exactly."""

import jax
import numpy as np
import pytest

from adreg_jax import ops, training
from adreg_jax.data import build_dataset, make_iterator
from adreg_jax.data.generated import _resample
from adreg_jax.data.synth_device import DeviceSynthBrain
from tests.test_synth import synth_config
from tests.test_training import tiny_config

SHAPE = (24, 28, 24)
# The tests share a module fixture (one compilation): one xdist worker runs them all.
pytestmark = pytest.mark.xdist_group("synth_device")


def device_config():
    config = synth_config(SHAPE)
    config.data.synth_on_device = True
    config.data.batch_size = 3
    config.data.synth_max_mm = 12.0
    config.data.synth_pair_max_mm = 12.0
    return config


@pytest.fixture(scope="module")
def batches():
    """Batches 0 and 1 of seed 0 and batch 0 of seed 1 (one compilation)."""
    stream = make_iterator(device_config().data, "train", seed=0)
    first, second = jax.device_get((next(stream), next(stream)))
    other = jax.device_get(next(make_iterator(device_config().data, "train", seed=1)))
    return first, second, other


def test_pairs_are_the_numpy_generators_in_kind_and_fixed_by_seed_and_index(batches):
    first, second, other = batches
    numpy_pair = build_dataset(synth_config(SHAPE).data, "val", seed=0)[0]
    assert set(first) == set(numpy_pair)
    for key, value in numpy_pair.items():
        assert first[key].shape == (3, *np.shape(value)), key
        assert first[key].dtype == np.asarray(value).dtype, key
    for key in ("fixed", "moving"):
        assert first[key].min() == 0.0 and first[key].max() == pytest.approx(1.0)
    for key in ("fixed_seg", "moving_seg"):
        assert set(np.unique(first[key])) == {0, 1, 2, 3}
    np.testing.assert_allclose(first["spacing"], 8.0)
    # pair i of the stream: the same wherever it is asked for, another for another index or seed
    synth_stream = DeviceSynthBrain.from_config(device_config().data, seed=0)
    alone = jax.device_get(synth_stream.pair(4))  # batch 1's second pair
    for key, value in alone.items():
        np.testing.assert_allclose(second[key][1], value, rtol=1e-5, atol=1e-5, err_msg=key)
    assert not np.allclose(first["fixed"][0], first["fixed"][1])
    assert not np.allclose(first["fixed"], second["fixed"])
    assert not np.allclose(first["fixed"], other["fixed"])


def test_a_resumed_stream_reads_the_batches_the_whole_one_read(batches):
    """Also under the other jax_threefry_partitionable setting (JAX's default; the suite turns it
    off): the stream pins its own."""
    with jax.threefry_partitionable(True):
        stream = make_iterator(device_config().data, "train", seed=0, start=1)
        resumed = jax.device_get(next(stream))
    for key, value in batches[1].items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)


def test_true_ddf_warps_the_moving_labels_onto_the_fixed_ones(batches):
    """Better than no field or the opposite one on every pair, by 0.05 Dice on average (labels
    of 8 mm voxels, resampled to the nearest twice)."""
    recovered, still = [], []
    for batch in batches[:2]:
        for index in range(3):
            ddf, moving, fixed = (batch[k][index] for k in ("true_ddf", "moving_seg", "fixed_seg"))
            assert np.abs(ddf).max() > 1.0  # a real deformation

            def dice_after(field, moving=moving, fixed=fixed):
                warped = _resample(moving, field, order=0)
                return float(np.mean(ops.dice(warped, fixed, (1, 2, 3))))

            recovered.append(dice_after(ddf))
            still.append(dice_after(np.zeros_like(ddf)))
            assert recovered[-1] > still[-1] and recovered[-1] > dice_after(-ddf) + 0.05
    assert np.mean(recovered) > np.mean(still) + 0.05 and min(recovered) > 0.6


def test_random_shapes_replace_the_anatomy_of_some_pairs_and_leave_the_others(batches):
    config = device_config()
    config.data.synth_shapes = 0.5
    stream = make_iterator(config.data, "train", seed=0)
    kinds = []
    for plain in batches[:2]:
        mixed = jax.device_get(next(stream))
        for index in range(3):
            if np.array_equal(mixed["fixed_seg"][index], plain["fixed_seg"][index]):
                kinds.append("atlas")  # not drawn as shapes: the pair without the option
                for key, value in mixed.items():  # (another program: float rounding apart)
                    np.testing.assert_allclose(
                        value[index], plain[key][index], atol=1e-4, err_msg=key
                    )
                continue
            kinds.append("shapes")
            fixed_seg, moving_seg = mixed["fixed_seg"][index], mixed["moving_seg"][index]
            # shapes fill the volume (the atlas's brain a fifth of it), in four classes
            assert set(np.unique(fixed_seg)) == {0, 1, 2, 3} and (fixed_seg > 0).mean() > 0.5
            assert mixed["same_contrast"][index] in (0.0, 1.0)
            before = float(np.mean(ops.dice(moving_seg, fixed_seg, (1, 2, 3))))
            warped = _resample(moving_seg, mixed["true_ddf"][index], order=0)
            assert float(np.mean(ops.dice(warped, fixed_seg, (1, 2, 3)))) > before
    assert sorted(set(kinds)) == ["atlas", "shapes"], kinds
    # the numpy generator has none: a Grain training stream with shapes is refused
    config.data.synth_on_device = False
    with pytest.raises(ValueError, match="synth_on_device=True"):
        make_iterator(config.data, "train", seed=0)


def test_maps_are_as_large_and_as_smooth_as_the_numpy_generators(batches):
    """Mean displacement (mm) and mean |gradient| of the pair's field inside the brain, over the
    6 pairs of two batches and 6 numpy pairs of the same options: within 25 % of each other (the
    Fourier-space field is calibrated to the numpy one, synth_device.SIGMA_PER_SPACING and
    MEAN_PER_LARGEST; configs/brain.py's pairs, with finer maps inside, are compared by
    benchmarks/bench_data.py --device)."""
    numpy_pairs = build_dataset(device_config().data, "val", seed=5)
    numpy_pairs = [numpy_pairs[i] for i in range(3)]
    numpy_pairs += [build_dataset(device_config().data, "test", seed=5)[i] for i in range(3)]
    device = [{k: v[i] for k, v in batch.items()} for batch in batches[:2] for i in range(3)]

    def sizes(pair):
        inside = pair["fixed_seg"] > 0
        mm = pair["true_ddf"] * 8.0
        grads = [np.abs(np.diff(mm, axis=a)).mean() / 8.0 for a in range(3)]
        return np.linalg.norm(mm, axis=-1)[inside].mean(), np.mean(grads)

    ours = np.mean([sizes(pair) for pair in device], axis=0)
    theirs = np.mean([sizes(pair) for pair in numpy_pairs], axis=0)
    np.testing.assert_allclose(ours, theirs, rtol=0.25)


def test_settings_it_cannot_honour_are_refused():
    config = device_config()
    config.data.augment_flip = True
    with pytest.raises(ValueError, match="augment_flip=False"):
        make_iterator(config.data, "train", seed=0)
    config = tiny_config()  # generated_brain
    config.data.synth_on_device = True
    with pytest.raises(ValueError, match="dataset='synth_brain'; got 'generated_brain'"):
        make_iterator(config.data, "train", seed=0)


@pytest.mark.slow
def test_train_py_trains_on_device_pairs(tmp_path):
    """A run of two steps on them, validated on the numpy generator's pairs (the resumed stream
    is the test above; resuming a run from its batch count, test_training's)."""
    config = tiny_config()
    config.data.dataset = "synth_brain"
    config.data.synth_on_device = True
    config.train.max_steps = 2
    config.train.eval_every = 2
    last = training.train_and_evaluate(config, tmp_path)
    assert np.isfinite(last["train/loss"]) and 0.0 < last["val/dice"] < 1.0
    assert (tmp_path / "checkpoints" / "2").is_dir()
