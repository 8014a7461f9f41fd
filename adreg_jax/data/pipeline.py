"""Grain pipelines: data set -> random-access pairs -> augmentation -> batches.

Where this sits: loaders (generated.py, dirlab.py) -> **pipeline** -> training step. Elements are
dicts per the batch-dict contract of docs/architecture.md without the batch axis; batches add it.
Batch ``i`` of a stream is a pure function of (config, seed, i): the pipeline stays a Grain
``MapDataset`` up to the batches, so a resumed run starts its stream at the batch it stopped at
(``make_iterator(..., start=step)``) and reads exactly what the uninterrupted run would have,
whatever its number of worker processes (Grain's own iterator state depends on it).
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator

import grain
import ml_collections
import numpy as np

from adreg_jax.data import dirlab, generated, generated_lung, ixi, labels, nifti, preprocess, synth

SPLITS = ("train", "val", "test")
# seeds of the three generated splits differ so that no pair is shared between them
_SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} unknown; expected one of {SPLITS}")


class _DirLabPairs:
    """Random-access DIR-Lab pairs: (case, fixed phase, moving phase), preprocessed to one shape.

    Only the T00/T50 pair has landmarks; cross-phase pairs (unsupervised) carry an all-False
    ``points_mask`` so that every element shares the same keys and shapes. A landmark pair that
    the preprocessing puts outside the grid (either point) is not real (mask False) and counted
    in ``points_outside``. With ``data.crop_center == "lungs"`` every pair of a case is cut with
    the one window centred on the lungs of its T00 and T50 images (found once per case).

    Besides the batch-dict keys: ``case`` (the DIR-Lab case number), ``points_outside``,
    ``grid_scale`` / ``grid_shift`` (the ``preprocess.GridMap`` raw -> network grid) and
    ``original_spacing`` (mm of the raw grid), so that TRE can be reported in the original mm.
    """

    def __init__(self, data: ml_collections.ConfigDict, cases, phase_pairs):
        self.data = data
        self.items = [(c, f, m) for c in cases for f, m in phase_pairs]
        self._lung_boxes: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _lung_box(self, case: int) -> np.ndarray | None:
        """(2, 3) raw-grid lung box of T00 and T50 together (None unless centring on lungs)."""
        if self.data.crop_center != "lungs":
            return None
        if case not in self._lung_boxes:
            raw = dirlab.load_dirlab_case(self.data.root, case)
            self._lung_boxes[case] = dirlab.find_lung_box(raw, float(self.data.hu_offset))
        return self._lung_boxes[case]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        case, fixed_phase, moving_phase = self.items[index]
        raw = dirlab.load_dirlab_case(self.data.root, case, images=False)
        raw.fixed = dirlab.read_image(self.data.root, case, fixed_phase).astype(np.float32)
        raw.moving = dirlab.read_image(self.data.root, case, moving_phase).astype(np.float32)
        out = dirlab.preprocess_case(
            raw,
            hu_window=tuple(self.data.hu_window) if self.data.hu_window else None,
            isotropic_mm=self.data.isotropic_mm or None,
            spacing_mm=tuple(self.data.spacing_mm) if self.data.spacing_mm else None,
            z_multiple=1,
            shape=tuple(self.data.image_size),
            center=str(self.data.crop_center),
            lung_box=self._lung_box(case),
            hu_offset=float(self.data.hu_offset),
        )
        n = int(self.data.max_points)
        fixed_points = np.zeros((n, 3), np.float32)
        moving_points = np.zeros((n, 3), np.float32)
        mask = np.zeros((n,), bool)
        outside = 0
        if (fixed_phase, moving_phase) == ("T00", "T50"):
            if len(out.fixed_points) > n:
                raise ValueError(
                    f"DIR-Lab case {case}: {len(out.fixed_points)} landmarks but "
                    f"config.data.max_points={n}; expected at least as many"
                )
            k = len(out.fixed_points)
            inside = out.points_inside()
            fixed_points[:k], moving_points[:k], mask[:k] = (
                out.fixed_points,
                out.moving_points,
                inside,
            )
            outside = int(k - inside.sum())
        return {
            "fixed": out.fixed[..., None].astype(np.float32),
            "moving": out.moving[..., None].astype(np.float32),
            "fixed_points": fixed_points,
            "moving_points": moving_points,
            "points_mask": mask,
            "points_outside": np.int32(outside),
            "spacing": out.spacing,
            "case": np.int32(case),
            "grid_scale": out.grid_map.scale.astype(np.float32),
            "grid_shift": out.grid_map.shift.astype(np.float32),
            "original_spacing": out.original_spacing.astype(np.float32),
        }


def dataset_labels(data: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Label ids evaluated with Dice for ``data.dataset`` (empty when it has no labels)."""
    if data.dataset == "generated_brain":
        return tuple(generated.BRAIN_LABELS)
    if data.dataset == "synth_brain":
        return tuple(synth.SYNTH_LABELS)
    if data.dataset == "ixi":
        return labels.IXI_VOI
    if data.dataset == "generated_lung":
        return generated_lung.LUNG_LABELS
    return ()


class _Resized:
    """Wrap a pair source: centred crop/pad of every volume to ``shape``; points follow, and a
    landmark pair pushed outside the grid is marked not real (``points_mask``) and counted
    (``points_outside``)."""

    def __init__(self, source, shape):
        self.source, self.shape = source, tuple(int(n) for n in shape)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        element = dict(self.source[index])
        grid_map = None
        for key in ("fixed", "moving", "fixed_seg", "moving_seg"):
            if key in element:
                element[key], grid_map = preprocess.crop_or_pad(element[key], self.shape)
        for key in ("fixed_points", "moving_points"):
            if key in element and grid_map is not None:
                element[key] = grid_map.forward(element[key]).astype(np.float32)
        if "fixed_points" in element and "moving_points" in element:
            real = element.get("points_mask", np.ones(len(element["fixed_points"]), bool))
            inside = preprocess.inside_grid(
                element["fixed_points"], self.shape
            ) & preprocess.inside_grid(element["moving_points"], self.shape)
            element["points_mask"] = real & inside
            element["points_outside"] = np.int32(np.sum(real & ~inside))
        return element


# what config.data.root is for each data set read from disk
_ROOT_HOLDS = {
    "dirlab": "the folder of the DIR-Lab cases (Case1Pack ... Case10Pack, Case8Deploy)",
    "ixi": "the folder of TransMorph's IXI data (atlas.pkl, Train/, Val/, Test/)",
    "pairs": "the CSV file that lists the NIfTI pairs",
}


def build_source(data: ml_collections.ConfigDict, split: str, seed: int):
    """The random-access source of one split (len and getitem of unbatched pair dicts)."""
    return build_dataset(data, split, seed)


def build_dataset(data: ml_collections.ConfigDict, split: str, seed: int) -> grain.MapDataset:
    """Random-access pairs of ``data.dataset`` for ``split`` (no augmentation, no batching)."""
    _check_split(split)
    if data.dataset in _ROOT_HOLDS and not str(data.get("root", "")):
        raise ValueError(
            f"config.data.root is not set; config.data.dataset={data.dataset!r} reads it: give "
            f"--config.data.root=PATH, {_ROOT_HOLDS[data.dataset]}"
        )
    if data.dataset == "generated_brain":
        length = {"train": data.train_size, "val": data.val_size, "test": data.test_size}[split]
        source = generated.GeneratedBrainPairs(
            shape=tuple(data.image_size),
            length=int(length),
            seed=int(seed) + _SPLIT_OFFSET[split],
            anatomy_voxels=data.anatomy_voxels,
            motion_voxels=data.motion_voxels,
            intensity=float(data.intensity),
        )
        return grain.MapDataset.source(source)
    if data.dataset == "synth_brain":
        length = {"train": data.train_size, "val": data.val_size, "test": data.test_size}[split]
        source = synth.SynthBrainPairs(
            shape=tuple(data.image_size),
            length=int(length),
            seed=int(seed) + _SPLIT_OFFSET[split],
            **synth.options_from_config(data),
        )
        return grain.MapDataset.source(source)
    if data.dataset == "generated_lung":
        length = {"train": data.train_size, "val": data.val_size, "test": data.test_size}[split]
        source = generated_lung.GeneratedLungPairs(
            shape=tuple(data.image_size),
            length=int(length),
            seed=int(seed) + _SPLIT_OFFSET[split],
            motion_mm=tuple(data.lung_motion_mm),
            num_points=int(data.lung_points),
        )
        return grain.MapDataset.source(source)
    if data.dataset == "dirlab":
        # leave-one-case-out: the held-out case is val and test, the other nine train
        held_out = int(data.test_case)
        if split == "train":
            cases = [c for c in dirlab.CASES if c != held_out]
            pairs = [("T00", "T50"), ("T50", "T00")] + [
                ("T00", p) for p in dirlab.PHASES[1:] if p != "T50"
            ] * int(data.cross_phase)
        else:
            cases, pairs = [held_out], [("T00", "T50")]
        return grain.MapDataset.source(_DirLabPairs(data, cases, pairs))
    if data.dataset == "ixi":
        return grain.MapDataset.source(_Resized(ixi.IXIPairs(data.root, split), data.image_size))
    if data.dataset == "pairs":
        return grain.MapDataset.source(
            _Resized(nifti.NiftiPairs(data.root, split), data.image_size)
        )
    raise ValueError(
        f"config.data.dataset={data.dataset!r} not supported; "
        "expected 'generated_brain', 'synth_brain', 'generated_lung', 'dirlab', 'ixi' or 'pairs'"
    )


def augment(element: dict, rng: np.random.Generator, flip: bool, intensity: float) -> dict:
    """Random flips (images, labels, true DDF and points together) and intensity gamma/scale."""
    element = dict(element)
    if flip:
        for axis in range(3):
            if rng.random() < 0.5:
                continue
            size = element["fixed"].shape[axis]
            for key in ("fixed", "moving", "fixed_seg", "moving_seg"):
                if key in element:
                    element[key] = np.flip(element[key], axis).copy()
            if "true_ddf" in element:
                ddf = np.flip(element["true_ddf"], axis).copy()
                ddf[..., axis] *= -1.0  # a flipped displacement points the other way
                element["true_ddf"] = ddf
            for key in ("fixed_points", "moving_points"):
                if key in element:
                    points = element[key].copy()
                    points[:, axis] = size - 1 - points[:, axis]
                    element[key] = points
            if "grid_scale" in element:  # the raw -> grid map of the points flips with them
                scale, shift = element["grid_scale"].copy(), element["grid_shift"].copy()
                scale[axis], shift[axis] = -scale[axis], size - 1 - shift[axis]
                element["grid_scale"], element["grid_shift"] = scale, shift
    if intensity > 0:
        for key in ("fixed", "moving"):
            gamma = float(np.exp(rng.normal(scale=0.2 * intensity)))
            scale = 1.0 + rng.uniform(-0.1, 0.1) * intensity
            element[key] = np.clip(scale * element[key] ** gamma, 0.0, 1.0).astype(np.float32)
    return element


def batched_dataset(
    data: ml_collections.ConfigDict,
    split: str,
    seed: int,
    shuffle: bool | None = None,
    repeat: bool | None = None,
) -> grain.MapDataset:
    """The stream as a random-access data set of batches (leading axis ``data.batch_size``):
    element ``i`` is batch ``i``.

    Train: shuffled, repeated forever, augmented. Val/test: fixed order, one pass, the last
    batch kept even if short.
    """
    is_train = split == "train"
    shuffle = is_train if shuffle is None else shuffle
    repeat = is_train if repeat is None else repeat
    dataset = build_dataset(data, split, seed)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    if repeat:
        dataset = dataset.repeat()
    if is_train and (data.augment_flip or data.augment_intensity > 0):
        # a partial of a module-level function pickles into spawned worker processes
        transform = functools.partial(
            augment, flip=bool(data.augment_flip), intensity=float(data.augment_intensity)
        )
        dataset = dataset.random_map(transform, seed=seed)
    return dataset.batch(int(data.batch_size), drop_remainder=is_train)


def make_iterator(
    data: ml_collections.ConfigDict,
    split: str,
    seed: int,
    shuffle: bool | None = None,
    repeat: bool | None = None,
    start: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Iterator of the batches of ``batched_dataset`` from batch ``start`` on (a resumed run:
    the number of batches read before), read by ``data.num_workers`` worker processes (0: in
    this process) with ``data.prefetch`` batches read ahead; the same batches for any number of
    workers.

    The training batches of ``data.synth_on_device``: ``synth_device.DeviceSynthBrain``'s,
    made on the default device in the training process (no workers, nothing copied to it)."""
    if split == "train" and data.get("synth_on_device", False):
        if shuffle is False or repeat is False:
            raise ValueError(
                "config.data.synth_on_device: the training stream is endless and fresh at every "
                f"batch; shuffle={shuffle}, repeat={repeat} asked for another"
            )
        from adreg_jax.data.synth_device import DeviceSynthBrain

        synth = DeviceSynthBrain.from_config(data, seed)
        return (synth.batch(index) for index in itertools.count(int(start)))
    if split == "train" and data.get("synth_shapes", 0.0) > 0:
        raise ValueError(
            f"config.data.synth_shapes={data.synth_shapes}: random-shape pairs are drawn on the "
            "device only; set config.data.synth_on_device=True"
        )
    dataset = batched_dataset(data, split, seed, shuffle, repeat)
    if start:
        dataset = dataset[int(start) :]
    iter_dataset = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=int(data.prefetch))
    )
    if data.num_workers > 0:
        iter_dataset = iter_dataset.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=int(data.num_workers)),
            worker_init_fn=_exit_with_parent,
        )
    return iter(iter_dataset)


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """Grain worker start-up: a daemon thread ends the worker once its parent is gone. Without
    it, a training run ended by a signal (kill, a scheduler's time limit) left its workers
    running, orphaned, each holding memory and CPU time until killed by hand. Ctrl-C, which the
    terminal sends to the workers too, is the training process's to handle (it saves and stops;
    the workers end with it): a worker ignores it, instead of dying with a traceback."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()  # the training process (gone already: reparented)
    parent_pid = parent.pid if parent is not None else os.getppid()

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
