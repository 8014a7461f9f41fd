"""Accuracy, folding and wall time on real scans: adreg-register against ANTs SyN.

    python benchmarks/real_scans.py --checkpoint runs/demo --unet runs/demo_unet
    python benchmarks/real_scans.py --pairs mni_to_scan lung --no-ants   # a subset, no ANTs
    python benchmarks/real_scans.py --model brain --pairs mni_to_scan scan_to_mni mni_t2_to_scan
    python benchmarks/real_scans.py --pairs mni_to_scan scan_to_mni --no-ants \
        --checkpoints full=runs/ablation/ad-regnet-full unet=runs/ablation/u-net-baseline

Needs ``../shared/data`` (see its README; nothing here is packaged) and, for the ANTs column,
``pip install antspyx``. Every method runs on this machine in this process, one after another,
on the same NIfTI files; each adreg row is an ``adreg-register`` call
(``registration.commands.main``), with glibc's malloc tuned as the console script tunes it
(``commands.keep_freed_memory``; for ANTs too, whose times it leaves as they were: mni_to_scan
63.5 s untuned, 60.8 s tuned, where adreg's instance optimisation went from 4.9 to 3.2 s; until
2026-11-28 every table was measured untuned).

Times compare like with like: for adreg, ``time_register_s``, from the images in memory to the
final displacement field (affine stage, network, instance optimisation); for ANTs, its
``ants.registration`` call plus composing its transforms into one displacement field. Reading and
writing files is left out of both. Each adreg method runs ``--repeat`` times (default 2) with a
persistent compilation cache in the output folder: "time s" is the last run (programs compiled
already, as for every scan after the first of a size), "first run s" the first (JIT compilation
included, except what an earlier method of the same size had compiled).

Pairs (moving -> fixed):
  mni_to_scan   the MNI152 2009a T1 template onto the labelled OASIS ``test_scan``; not
                pre-aligned (``--affine``); Dice on grey and white matter: the template's GM/WM
                probability maps (argmax, > 0.5) against the scan's FreeSurfer labels grouped into
                GM (cerebral and cerebellar cortex) and WM (cerebral and cerebellar white matter).
  scan_to_mni   the reverse direction, Dice on the same two classes.
  oasis_b_to_a  two unlabelled OASIS subjects (affinely pre-aligned): local NCC only.
  lung          the real thoracic CT against itself under a known breathing motion (diaphragm
                moving up to 12 mm superior-inferior, 4 mm anterior-posterior chest expansion,
                both fading outside the lungs); TRE on the 10 elastix landmarks and 100 points
                inside the lung mask, whose true positions the applied motion gives.
  lung_dirlab   DIR-Lab size: the generated breathing thorax (adreg_jax.data.generated_lung) at
                141 x 256 x 256, 2 x 1.95 x 1.95 mm, in HU with noise, diaphragm moving 20 mm;
                TRE on its vessel landmarks in the lungs (known truth: the phantom's motion).
  mni_t2_to_scan  mni_to_scan with the template remapped to a T2-like contrast (CSF bright, GM
                above WM), ``--similarity mi``: Dice beside the same-contrast pair.
  thick_slice   one brain as a thick-slice multi-modal pair: T1 at 0.5 x 0.5 x 3 mm (320 x 384 x
                18) and the T2-like contrast at 2 x 2 x 3 mm (80 x 96 x 18) through a known smooth
                motion (up to 4 mm) and a 4 degree rotation; ``--affine --similarity mi``, Dice
                on GM/WM.

Methods: before; AD-RegNet (network only, ``--checkpoint``); AD-RegNet + instance optimisation;
the packaged pretrained model (``--model NAME``: "AD-RegNet pretrained (NAME)", network only, and
"AD-RegNet pretrained + instance opt."; on the brain pairs, not the CT ones); one network-only
row per ``--checkpoints NAME=RUN_DIR`` (named NAME: the ablation variants,
``benchmarks/ablation.py``); instance optimisation alone (no trained model); the U-Net baseline
(network only); ANTs SyN (antspyx ``type_of_transform="SyN"``: affine + SyN, Mattes MI, the
package's defaults). Every "+ instance opt." row and "instance opt. only" use ``--steps``
(default: the command's, chosen from the scan).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import nibabel as nib
import numpy as np
from scipy import ndimage

from adreg_jax import ops
from adreg_jax.data.nifti import load_nifti, save_nifti
from adreg_jax.registration import commands, loading
from adreg_jax.registration.metrics import dice_report
from adreg_jax.training import run_of

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
FS_GM = (3, 42, 8, 47)  # cerebral cortex L/R, cerebellar cortex L/R
FS_WM = (2, 41, 7, 46)  # cerebral white matter L/R, cerebellar white matter L/R
GMWM = {"1": "GM", "2": "WM"}
PAIRS = (
    "mni_to_scan",
    "scan_to_mni",
    "oasis_b_to_a",
    "lung",
    "lung_dirlab",
    "mni_t2_to_scan",
    "thick_slice",
)

# the CT pairs: a packaged model (``--model``, a brain model) is not run on them
CT_PAIRS = ("lung", "lung_dirlab")


def prepare_pairs(data: Path, out: Path, names: Sequence[str]) -> dict[str, dict]:
    """The input files of the pairs ``names`` (of ``PAIRS``), written into ``out``: only the
    preparations those pairs need (mni_t2_to_scan is made from mni_to_scan's files)."""
    names = set(names)
    pairs: dict[str, dict] = {}
    if names & {"mni_to_scan", "scan_to_mni", "oasis_b_to_a", "mni_t2_to_scan"}:
        pairs.update(prepare_brain(data, out))
    if "mni_t2_to_scan" in names:
        pairs.update(prepare_multimodal(pairs, out))
    if "lung" in names:
        pairs.update(prepare_lung(data, out))
    if "lung_dirlab" in names:
        pairs.update(prepare_lung_dirlab(out))
    if "thick_slice" in names:
        pairs.update(prepare_thick_slice(data, out))
    return pairs


def shared_data(path: str) -> Path | None:
    """``path`` resolved when it holds the shared real scans (``brain/test_scan.npz``); else
    None, with the error printed (a benchmark then exits with 1)."""
    data = Path(path).resolve()
    if (data / "brain" / "test_scan.npz").is_file():
        return data
    print(f"error: {data} does not hold the real scans (brain/test_scan.npz)", file=sys.stderr)
    return None


def read_mha(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A MetaImage (.mha, one file, optionally zlib-compressed) -> (array (x, y, z), spacing,
    offset)."""
    raw = path.read_bytes()
    header, pos = {}, 0
    while True:
        end = raw.index(b"\n", pos)
        key, _, value = raw[pos:end].decode().partition("=")
        header[key.strip()] = value.strip()
        pos = end + 1
        if key.strip() == "ElementDataFile":
            break
    if header["ElementDataFile"] != "LOCAL":
        raise ValueError(f"{path}: only single-file .mha images are read")
    dtype = {"MET_SHORT": "<i2", "MET_UCHAR": "u1", "MET_FLOAT": "<f4"}[header["ElementType"]]
    data = raw[pos:]
    if header.get("CompressedData") == "True":
        data = zlib.decompress(data)
    shape = [int(v) for v in header["DimSize"].split()]
    array = np.frombuffer(data, dtype).reshape(shape[::-1]).transpose(2, 1, 0)
    spacing = np.array([float(v) for v in header["ElementSpacing"].split()])
    offset = np.array([float(v) for v in header["Offset"].split()])
    return array, spacing, offset


# --- inputs -------------------------------------------------------------------------------------


def prepare_brain(data: Path, out: Path) -> dict[str, dict[str, str]]:
    """NIfTI inputs for the brain pairs: test_scan (+ GM/WM labels) on the OASIS grid and
    affine, the MNI template (+ GM/WM labels from its probability maps)."""
    oasis_affine = nib.load(str(data / "brain" / "oasis_a.nii.gz")).affine
    scan = np.load(data / "brain" / "test_scan.npz")
    seg = np.rint(scan["seg"]).astype(np.int32)
    gmwm = np.where(np.isin(seg, FS_GM), 1, np.where(np.isin(seg, FS_WM), 2, 0))
    files = {"scan": out / "test_scan.nii.gz", "scan_seg": out / "test_scan_gmwm.nii.gz"}
    nib.save(nib.Nifti1Image(scan["vol"].astype(np.float32), oasis_affine), files["scan"])
    nib.save(nib.Nifti1Image(gmwm.astype(np.int16), oasis_affine), files["scan_seg"])
    mni = data / "mni152"
    t1 = nib.load(str(mni / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
    gm = np.asarray(nib.load(str(mni / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")).dataobj)
    wm = np.asarray(nib.load(str(mni / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")).dataobj)
    labels = np.where((gm > 0.5) & (gm >= wm), 1, np.where(wm > 0.5, 2, 0))
    files["mni"] = out / "mni152_t1.nii.gz"
    files["mni_seg"] = out / "mni152_gmwm.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj, np.float32), t1.affine), files["mni"])
    nib.save(nib.Nifti1Image(labels.astype(np.int16), t1.affine), files["mni_seg"])

    def labelled(fixed: str, moving: str) -> dict:
        return dict(
            fixed=files[fixed],
            moving=files[moving],
            fixed_seg=files[f"{fixed}_seg"],
            moving_seg=files[f"{moving}_seg"],
            affine=True,
        )

    return {
        "mni_to_scan": labelled("scan", "mni"),
        "scan_to_mni": labelled("mni", "scan"),
        "oasis_b_to_a": dict(
            fixed=data / "brain" / "oasis_a.nii.gz",
            moving=data / "brain" / "oasis_b.nii.gz",
            affine=False,
        ),
    }


def breathing_motion(lungs: np.ndarray, spacing: np.ndarray, si_mm=12.0, ap_mm=4.0) -> np.ndarray:
    """A smooth breathing displacement (x, y, z, 3) in voxels: superior-inferior motion growing
    towards the diaphragm, anterior-posterior expansion, both weighted by a blurred lung mask."""
    shape = lungs.shape
    weight = ndimage.gaussian_filter(lungs.astype(np.float32), sigma=20.0 / spacing)
    weight /= max(float(weight.max()), 1e-6)
    z = np.arange(shape[2], dtype=np.float32) / (shape[2] - 1)  # 0 = inferior
    y = np.arange(shape[1], dtype=np.float32) / (shape[1] - 1) - 0.5
    lung_z = np.nonzero(lungs.any(axis=(0, 1)))[0]
    base = lung_z.min() / (shape[2] - 1)
    si = si_mm * np.clip(1.0 - (z - base) / max(1.0 - base, 1e-3), 0.0, 1.0)
    ddf = np.zeros((*shape, 3), np.float32)
    ddf[..., 2] = weight * si[None, None, :] / spacing[2]
    ddf[..., 1] = weight * (ap_mm * 2.0 * y)[None, :, None] / spacing[1]
    return ddf


def prepare_lung(data: Path, out: Path, seed: int = 0) -> dict[str, dict[str, str]]:
    """Fixed = the real CT; moving = the CT warped by ``breathing_motion``; landmarks."""
    ct, spacing, offset = read_mha(data / "lung" / "3DCT_lung_baseline_small.mha")
    mask, mask_spacing, mask_offset = read_mha(data / "lung" / "3DCT_lung_baseline_mask.mha")
    # lung mask and landmarks live on the 1.366 x 1.366 x 2.5 mm grid: map them through world mm
    to_small = lambda idx: (idx * mask_spacing + mask_offset - offset) / spacing  # noqa: E731
    coords = np.indices(ct.shape, dtype=np.float64).reshape(3, -1).T
    lungs = (
        ndimage.map_coordinates(
            mask.astype(np.float32),
            ((coords * spacing + offset - mask_offset) / mask_spacing).T,
            order=0,
        ).reshape(ct.shape)
        > 0
    )
    landmarks = np.loadtxt(data / "lung" / "3DCT_lung_baseline.txt", skiprows=2)
    inside = np.argwhere(lungs).astype(np.float64)
    rng = np.random.default_rng(seed)
    extra = inside[rng.choice(len(inside), size=100, replace=False)]
    moving_points = np.concatenate([to_small(landmarks), extra])  # points of the moving image
    motion = breathing_motion(lungs, spacing)
    hu = ct.astype(np.float32)
    # moving(q) = ct(q + motion(q)): the anatomy at q in moving sits at q + motion(q) in fixed
    moving = np.asarray(
        ops.warp(jnp.asarray(hu)[..., None], jnp.asarray(motion), mode="border")[..., 0]
    )
    fixed_points = moving_points + np.asarray(
        ops.sample_ddf_at_points(jnp.asarray(motion), jnp.asarray(moving_points))
    )
    affine = np.diag([*spacing, 1.0])
    files = {k: out / f"lung_{k}" for k in ("fixed.nii.gz", "moving.nii.gz")}
    save_nifti(files["fixed.nii.gz"], hu, affine)
    save_nifti(files["moving.nii.gz"], moving, affine)
    np.savetxt(out / "lung_fixed_points.txt", fixed_points, fmt="%.4f")
    np.savetxt(out / "lung_moving_points.txt", moving_points, fmt="%.4f")
    return {
        "lung": dict(
            fixed=files["fixed.nii.gz"],
            moving=files["moving.nii.gz"],
            fixed_points=out / "lung_fixed_points.txt",
            moving_points=out / "lung_moving_points.txt",
            affine=False,
        )
    }


def t2_like(t1: np.ndarray) -> np.ndarray:
    """A T2-like contrast from a T1 scan normalised to [0, 1]: CSF bright, grey matter above
    white matter, background dark (a non-monotonic map: local NCC cannot follow it, MI can)."""
    return np.where(
        t1 < 0.05, 0.0, np.interp(t1, [0.05, 0.3, 0.55, 0.8, 1.0], [0.9, 0.8, 0.55, 0.35, 0.3])
    ).astype(np.float32)


def prepare_multimodal(pairs: dict, out: Path) -> dict[str, dict]:
    """mni_t2_to_scan: mni_to_scan with the moving template remapped to a T2-like contrast,
    registered with ``--similarity mi`` (Dice on the same GM/WM labels)."""
    source = pairs["mni_to_scan"]
    t1, affine = load_nifti(source["moving"])
    path = out / "mni152_t2like.nii.gz"
    save_nifti(path, t2_like(loading.normalise(t1, str(source["moving"]))), affine)
    return {"mni_t2_to_scan": {**source, "moving": path, "similarity": "mi"}}


def smooth_motion(shape, spacing, amplitude_mm: float, seed: int, sigma_mm: float = 25.0):
    """A smooth random displacement (*shape, 3) in mm whose largest magnitude is amplitude_mm."""
    rng = np.random.default_rng(seed)
    motion = np.stack(
        [
            ndimage.gaussian_filter(rng.normal(size=shape), sigma_mm / np.asarray(spacing))
            for _ in range(3)
        ],
        axis=-1,
    )
    return motion * amplitude_mm / np.sqrt((motion**2).sum(-1)).max()


def prepare_thick_slice(data: Path, out: Path, seed: int = 0) -> dict[str, dict]:
    """thick_slice: a thick-slice multi-modal pair of one brain: fixed = T1 at 0.5 x 0.5 x 3 mm,
    320 x 384 x 18 (a 3 mm slice profile); moving = the T2-like contrast at 2 x 2 x 3 mm,
    80 x 96 x 18, through a known smooth motion of up to 4 mm and a 4 degree in-plane rotation;
    GM/WM label maps on both grids for Dice."""
    scan = np.load(data / "brain" / "test_scan.npz")
    vol = scan["vol"].astype(np.float32)
    seg = np.rint(scan["seg"]).astype(np.int32)
    gmwm = np.where(np.isin(seg, FS_GM), 1, np.where(np.isin(seg, FS_WM), 2, 0))
    slices, z0 = 18, vol.shape[2] / 2 - 27.0  # a 54 mm slab in the middle (source voxel = 1 mm)
    profile = ndimage.gaussian_filter1d(vol, 3.0 / 2.355, axis=2)  # 3 mm FWHM slice profile

    def grid(in_plane: float):
        shape = (int(vol.shape[0] / in_plane), int(vol.shape[1] / in_plane), slices)
        offset = np.array([(in_plane - 1) / 2, (in_plane - 1) / 2, z0 + 1.0])
        affine = np.diag([in_plane, in_plane, 3.0, 1.0])
        affine[:3, 3] = offset
        world = np.indices(shape, dtype=np.float64).reshape(3, -1).T @ affine[:3, :3] + offset
        return shape, affine, world  # world = source voxel coordinates (mm)

    fixed_shape, fixed_affine, fixed_world = grid(0.5)
    sample = lambda image, points, order: ndimage.map_coordinates(  # noqa: E731
        image, points.T, order=order, mode="constant"
    )
    fixed = sample(profile, fixed_world, 1).reshape(fixed_shape)
    fixed_seg = sample(gmwm, fixed_world, 0).reshape(fixed_shape)
    moving_shape, moving_affine, moving_world = grid(2.0)
    angle = np.deg2rad(4.0)
    centre = np.array([vol.shape[0] / 2, vol.shape[1] / 2, z0 + 27.0])
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    motion = smooth_motion(moving_shape, (2.0, 2.0, 3.0), 4.0, seed).reshape(-1, 3)
    # the anatomy at moving-grid point w sits at R (w - c) + c + u(w) in the source
    source_points = (moving_world - centre) @ rotation.T + centre + motion
    moving = t2_like(sample(profile, source_points, 1)).reshape(moving_shape)
    moving_seg = sample(gmwm, source_points, 0).reshape(moving_shape)
    files = {name: out / f"thick_{name}.nii.gz" for name in ("fixed", "moving", "fseg", "mseg")}
    save_nifti(files["fixed"], fixed.astype(np.float32), fixed_affine)
    save_nifti(files["moving"], moving.astype(np.float32), moving_affine)
    save_nifti(files["fseg"], fixed_seg.astype(np.int16), fixed_affine)
    save_nifti(files["mseg"], moving_seg.astype(np.int16), moving_affine)
    return {
        "thick_slice": dict(
            fixed=files["fixed"],
            moving=files["moving"],
            fixed_seg=files["fseg"],
            moving_seg=files["mseg"],
            affine=True,
            similarity="mi",
        )
    }


# HU of the phantom's tissue classes (air, lung, soft tissue, vessel, bone): its [0, 1]
# intensities are 0, 0.1, 0.5, 0.8 and 1.
PHANTOM_HU = ([0.0, 0.1, 0.5, 0.8, 1.0], [-1000.0, -850.0, 40.0, 150.0, 700.0])


def prepare_lung_dirlab(out: Path, seed: int = 0) -> dict[str, dict]:
    """lung_dirlab: the generated breathing thorax at DIR-Lab size, 141 x 256 x 256 at 2 x 1.95 x
    1.95 mm, diaphragm moving 20 mm, in HU (with 20 HU noise, drawn apart for each phase); 150
    vessel landmarks in the lungs whose true positions the phantom's motion gives (those that
    leave the field of view left out)."""
    from adreg_jax.data.generated_lung import GeneratedLungPairs

    files = {k: out / f"lung_dirlab_{k}" for k in ("fixed.nii.gz", "moving.nii.gz")}
    points = {k: out / f"lung_dirlab_{k}_points.txt" for k in ("fixed", "moving")}
    spacing = np.array([282.0 / 141, 500.0 / 256, 500.0 / 256])
    if not all(p.exists() for p in (*files.values(), *points.values())):
        phantom = GeneratedLungPairs(
            shape=(141, 256, 256),
            length=1,
            seed=seed,
            field_of_view_mm=(282.0, 500.0, 500.0),
            motion_mm=(20.0, 20.0),
            num_points=150,
        )[0]
        rng = np.random.default_rng(seed)
        # a landmark near the diaphragm can move out of the field of view: left out
        inside = np.ones(150, bool)
        for name in ("fixed", "moving"):
            coords = phantom[f"{name}_points"]
            inside &= np.all((coords >= 0) & (coords <= np.asarray((141, 256, 256)) - 1), axis=1)
        for name in ("fixed", "moving"):
            noise = rng.normal(0.0, 20.0, phantom[name].shape[:3])
            hu = np.interp(phantom[name][..., 0], *PHANTOM_HU) + noise
            save_nifti(files[f"{name}.nii.gz"], hu.astype(np.int16), np.diag([*spacing, 1.0]))
            np.savetxt(points[name], phantom[f"{name}_points"][inside], fmt="%.4f")
    return {
        "lung_dirlab": dict(
            fixed=files["fixed.nii.gz"],
            moving=files["moving.nii.gz"],
            fixed_points=points["fixed"],
            moving_points=points["moving"],
            affine=False,
        )
    }


# --- methods ------------------------------------------------------------------------------------


def pair_argv(pair: dict) -> list[str]:
    """The ``adreg-register`` flags a pair implies: its files (scans, label maps, points) and its
    ``--affine`` / ``--similarity``."""
    argv = ["--fixed", str(pair["fixed"]), "--moving", str(pair["moving"])]
    if pair.get("affine"):
        argv.append("--affine")
    if pair.get("similarity"):
        argv += ["--similarity", pair["similarity"]]
    for key in ("fixed_seg", "moving_seg", "fixed_points", "moving_points"):
        if key in pair:
            argv += [f"--{key.replace('_', '-')}", str(pair[key])]
    return argv


def run_adreg(
    pair: dict,
    out: Path,
    checkpoint: str | None,
    steps: Sequence[int] | None,
    cache: str,
    repeat: int,
    model: str | None = None,
    flags: Sequence[str] = (),
) -> dict:
    """``adreg-register`` on the pair ``repeat`` times; the metrics of the last run, with the
    first run's times added (``first_*``: compilation included, unless the cache had it).

    The network: ``checkpoint`` (a train.py run directory, ``--checkpoint``) or ``model`` (a
    packaged pretrained model's name, ``--model``), or neither (instance optimisation alone);
    ``steps`` [0]: the network's field is the result, unless it lowers the similarity (then the
    affine stage's alone; ``flags`` ["--keep-network"]: the network's field whatever it does).
    ``flags``: more of the command's options."""
    argv = [*pair_argv(pair), "--out", str(out), "--cache-dir", cache, "--quiet", *flags]
    if steps:
        argv += ["--instance-steps", *map(str, steps)]
    if checkpoint and model:
        raise ValueError(f"run_adreg: a checkpoint ({checkpoint}) or a model ({model}), not both")
    if checkpoint:
        argv += ["--checkpoint", checkpoint]
    if model:
        argv += ["--model", model]
    first = None
    for _ in range(repeat):
        if commands.main(argv) != 0:
            raise RuntimeError(f"adreg-register failed: {argv}")
        metrics = json.loads((out / "metrics.json").read_text())
        first = first or metrics
    metrics["first_time_register_s"] = first["time_register_s"]
    metrics["first_time_s"] = first["time_s"]
    return metrics


def run_ants(pair: dict, out: Path) -> dict:
    """ANTs SyN on the same arrays (the moving scan on the fixed grid, as adreg sees it)."""
    import ants

    fixed, fixed_affine = load_nifti(pair["fixed"])
    moving, moving_affine = load_nifti(pair["moving"])
    fixed = loading.normalise(fixed, str(pair["fixed"]))
    moving = loading.resample_to_grid(
        loading.normalise(moving, str(pair["moving"])), moving_affine, fixed.shape, fixed_affine, 1
    )
    spacing = np.sqrt((fixed_affine[:3, :3] ** 2).sum(axis=0))
    to_ants = lambda a: ants.from_numpy(np.ascontiguousarray(a, np.float32), spacing=tuple(spacing))  # noqa: E731
    started = time.perf_counter()
    result = ants.registration(to_ants(fixed), to_ants(moving), type_of_transform="SyN")
    composite = ants.apply_transforms(
        to_ants(fixed), to_ants(moving), result["fwdtransforms"], compose=str(out / "ants_")
    )
    elapsed = time.perf_counter() - started
    disp = ants.image_read(composite).numpy()  # (x, y, z, 3) physical mm, pulls like ours
    ddf = jnp.asarray(disp / spacing, jnp.float32)
    return _metrics_from_ddf(pair, fixed, moving, fixed_affine, moving_affine, ddf, elapsed)


def _metrics_from_ddf(pair, fixed, moving, fixed_affine, moving_affine, ddf, elapsed) -> dict:
    """The metrics.json keys of adreg-register for a DDF (D, H, W, 3) found by another tool."""
    fixed_j, moving_j = jnp.asarray(fixed)[..., None], jnp.asarray(moving)[..., None]
    warped = ops.warp(moving_j, ddf)
    metrics = {
        "ncc_before": float(ops.ncc_local(moving_j, fixed_j)),
        "ncc_after": float(ops.ncc_local(warped, fixed_j)),
        "folding_percent": float(100.0 * ops.folding_fraction(ddf)),
        "time_register_s": elapsed,
    }
    if "fixed_seg" in pair:
        fixed_seg = np.rint(load_nifti(pair["fixed_seg"])[0]).astype(np.int32)
        moving_seg = loading.resample_to_grid(
            np.rint(load_nifti(pair["moving_seg"])[0]).astype(np.int32),
            moving_affine,
            fixed.shape,
            fixed_affine,
            order=0,
        )
        warped_seg = np.asarray(ops.warp(jnp.asarray(moving_seg)[..., None], ddf, order=0)[..., 0])
        metrics.update(dice_report(fixed_seg, moving_seg, warped_seg))
    if "fixed_points" in pair:
        spacing = np.sqrt((fixed_affine[:3, :3] ** 2).sum(axis=0))
        fp = jnp.asarray(np.loadtxt(pair["fixed_points"]))
        mp = jnp.asarray(np.loadtxt(pair["moving_points"]))
        metrics["tre_mm"] = float(jnp.mean(ops.tre(fp, mp, ddf, spacing)))
        metrics["tre_mm_before"] = float(jnp.mean(ops.tre(fp, mp, jnp.zeros_like(ddf), spacing)))
    return metrics


# --- table --------------------------------------------------------------------------------------


def _row(pair_name: str, method: str, m: dict, before: bool = False) -> str:
    suffix = "_before" if before else ""
    dice = m.get(f"dice{suffix}")
    dice_cells = (
        " / ".join(f"{dice[k]:.3f}" for k in sorted(dice)) + f" ({m[f'dice_mean{suffix}']:.3f})"
        if dice
        else ""
    )
    tre = m.get(f"tre_mm{suffix}")
    ncc = m["ncc_before"] if before else m["ncc_after"]
    folding = "" if before else f"{m['folding_percent']:.4f}"
    time_s = "" if before else f"{m['time_register_s']:.1f}"
    first = m.get("first_time_register_s")
    first_s = "" if before or first is None else f"{first:.1f}"
    tre_cell = f"{tre:.2f}" if tre is not None else ""
    if not before and m.get("network_kept") is False:
        method += " (field dropped: it lowered the similarity)"
    return (
        f"| {pair_name} | {method} | {dice_cells} | {tre_cell} | {ncc:.3f} | {folding} "
        f"| {time_s} | {first_s} |"
    )


def method_dir(method: str) -> str:
    """A method's output folder name: its row name with spaces (and anything unsafe in a path)
    as underscores ("AD-RegNet + instance opt." -> "AD-RegNet_+_instance_opt.")."""
    return re.sub(r"[^\w.+()=-]", "_", method)


def _methods(args) -> list[tuple[str, str | None, str | None, list[int] | None, list[str]]]:
    """(row name, checkpoint, pretrained model, instance steps, more flags) of each adreg method
    asked for, in table order; ``ValueError`` for a malformed ``--checkpoints`` entry, a run
    directory without a config.json, an unknown model, a row name given twice or
    ``--network-scales`` without a network."""
    methods = []
    scales = args.network_scales or []
    passes = ["--network-scales", *scales]
    if args.checkpoint:
        methods += [
            ("AD-RegNet", args.checkpoint, None, [0], []),
            ("AD-RegNet + instance opt.", args.checkpoint, None, args.steps, []),
        ]
        if scales:
            methods.append(
                (f"AD-RegNet, scales {' '.join(scales)}", args.checkpoint, None, [0], passes)
            )
    if args.model:
        from adreg_jax import pretrained

        pretrained.weights_path(args.model)  # an unknown name: the error lists the known ones
        methods += [
            (f"AD-RegNet pretrained ({args.model})", None, args.model, [0], []),
            ("AD-RegNet pretrained + instance opt.", None, args.model, args.steps, []),
        ]
        if scales:
            name = f"AD-RegNet pretrained, scales {' '.join(scales)}"
            methods.append((name, None, args.model, [0], passes))
    if scales and not (args.checkpoint or args.model):
        raise ValueError("--network-scales needs --model or --checkpoint")
    for entry in args.checkpoints:
        name, sep, run = entry.partition("=")
        if not (sep and name and run):
            raise ValueError(f"--checkpoints {entry!r}: expected NAME=RUN_DIR")
        methods.append((name, run, None, [0], []))
    methods.append(("instance opt. only", None, None, args.steps, []))
    if args.unet:
        methods.append(("U-Net baseline", args.unet, None, [0], []))
    names = [method[0] for method in methods]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"method names given twice: {twice}; give each --checkpoints its own")
    for name, run, *_ in methods:
        if run and not (run_of(run)[0] / "config.json").is_file():
            raise ValueError(
                f"{name}: {run} has no config.json; expected a train.py run directory or one of "
                "its checkpoints (RUN/checkpoints/N)"
            )
    return methods


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--out", default=None, help="keep inputs and outputs here")
    parser.add_argument("--checkpoint", help="an AD-RegNet run directory (train.py)")
    parser.add_argument(
        "--model",
        help="a pretrained model of the package (adreg_jax.pretrained, e.g. brain): network "
        "only, then with instance optimisation",
    )
    parser.add_argument(
        "--checkpoints",
        nargs="+",
        default=[],
        metavar="NAME=RUN_DIR",
        help="more train.py runs, one network-only row each, named NAME (e.g. ablation variants)",
    )
    parser.add_argument(
        "--network-scales",
        nargs="+",
        help="one more network-only row for --model / --checkpoint, these values passed to "
        "adreg-register --network-scales (which checks them)",
    )
    parser.add_argument("--unet", help="a U-Net baseline run directory")
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=None,
        help="instance steps per level (default: the command's, chosen from the scan)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="runs of each adreg method; the table shows the last (compilation cached) and the "
        "first",
    )
    parser.add_argument(
        "--pairs",
        nargs="+",
        default=list(PAIRS),
    )
    parser.add_argument("--no-ants", action="store_true")
    args = parser.parse_args(argv)
    commands.keep_freed_memory()  # as the adreg-register console script does
    data = shared_data(args.data)
    if data is None:
        return 1
    unknown = sorted(set(args.pairs) - set(PAIRS))
    if unknown:
        print(f"error: unknown pairs {unknown}; known: {list(PAIRS)}", file=sys.stderr)
        return 1
    try:
        methods = _methods(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    out = Path(args.out or tempfile.mkdtemp(prefix="real_scans_"))
    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    pairs = prepare_pairs(data, inputs, args.pairs)
    ants_ok = not args.no_ants
    if ants_ok:
        try:
            import ants  # noqa: F401
        except ImportError:
            print("antspyx not installed: no ANTs SyN rows (pip install antspyx)")
            ants_ok = False
    lines = [
        "| pair | method | Dice GM / WM (mean) | TRE mm | NCC | % det J <= 0 | time s "
        "| first run s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    results = {}
    for name in args.pairs:
        pair = pairs[name]
        rows = {}
        for method, checkpoint, model, steps, flags in methods:
            if model and name in CT_PAIRS:
                continue
            rows[method] = run_adreg(
                pair,
                out / name / method_dir(method),
                checkpoint,
                steps,
                cache=str(out / "xla_cache"),
                repeat=args.repeat,
                model=model,
                flags=flags,
            )
            print(f"{name}: {method}: {json.dumps(rows[method])}", flush=True)
        if ants_ok:
            (out / name).mkdir(parents=True, exist_ok=True)
            rows["ANTs SyN"] = run_ants(pair, out / name)
            print(f"{name}: ANTs SyN: {json.dumps(rows['ANTs SyN'])}", flush=True)
        first = next(iter(rows.values()))
        lines.append(_row(name, "before", first, before=True))
        lines.extend(_row(name, method, m) for method, m in rows.items())
        results[name] = rows
    table = "\n".join(lines)
    (out / "real_scans.json").write_text(json.dumps(results, indent=2))
    (out / "real_scans.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out}/real_scans.md and real_scans.json")
    if not args.out:  # the temporary folder keeps the table only (the outputs: gigabytes)
        for folder in (p for p in out.iterdir() if p.is_dir()):
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
