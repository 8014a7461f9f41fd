"""Data: DIR-Lab, IXI (TransMorph pickles), NIfTI pair lists, generated brain and lung pairs,
synthesised brain pairs (numpy, or JAX on the device), and the Grain pipelines that batch them
(see docs/architecture.md for the batch dict).

The names below are imported on first use (PEP 562): ``adreg-register`` reads NIfTI files through
``adreg_jax.data.nifti`` and should not pay for Grain, Orbax and SciPy at start-up (importing
them all took about 0.7 s of the command's 1.7 s of imports)."""

from __future__ import annotations

import importlib

_SOURCES = {
    "DirLabCase": "dirlab",
    "load_dirlab_case": "dirlab",
    "preprocess_case": "dirlab",
    "tre_mm": "dirlab",
    "BRAIN_LABELS": "generated",
    "GeneratedBrainPairs": "generated",
    "load_atlas": "generated",
    "LUNG_LABELS": "generated_lung",
    "GeneratedLungPairs": "generated_lung",
    "IXIPairs": "ixi",
    "load_pickle": "ixi",
    "IXI_FREESURFER_IDS": "labels",
    "IXI_GROUPS": "labels",
    "IXI_VOI": "labels",
    "to_ixi_labels": "labels",
    "NiftiPairs": "nifti",
    "load_nifti": "nifti",
    "read_pair_list": "nifti",
    "save_nifti": "nifti",
    "DeviceSynthBrain": "synth_device",
    "batched_dataset": "pipeline",
    "build_dataset": "pipeline",
    "build_source": "pipeline",
    "dataset_labels": "pipeline",
    "make_iterator": "pipeline",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SOURCES[name]}"), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
