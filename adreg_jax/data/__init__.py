"""Data: DIR-Lab, IXI (TransMorph pickles), NIfTI pair lists, generated brain and lung pairs,
and the Grain pipelines that batch them (see docs/architecture.md for the batch dict)."""

from adreg_jax.data.dirlab import DirLabCase, load_dirlab_case, preprocess_case, tre_mm
from adreg_jax.data.generated import BRAIN_LABELS, GeneratedBrainPairs, load_atlas
from adreg_jax.data.generated_lung import LUNG_LABELS, GeneratedLungPairs
from adreg_jax.data.ixi import IXIPairs, load_pickle
from adreg_jax.data.labels import IXI_FREESURFER_IDS, IXI_GROUPS, IXI_VOI, to_ixi_labels
from adreg_jax.data.nifti import NiftiPairs, load_nifti, read_pair_list, save_nifti
from adreg_jax.data.pipeline import build_dataset, build_source, dataset_labels, make_iterator

__all__ = [
    "BRAIN_LABELS",
    "IXI_FREESURFER_IDS",
    "IXI_GROUPS",
    "IXI_VOI",
    "LUNG_LABELS",
    "DirLabCase",
    "GeneratedBrainPairs",
    "GeneratedLungPairs",
    "IXIPairs",
    "NiftiPairs",
    "build_dataset",
    "build_source",
    "dataset_labels",
    "load_atlas",
    "load_dirlab_case",
    "load_nifti",
    "load_pickle",
    "make_iterator",
    "preprocess_case",
    "read_pair_list",
    "save_nifti",
    "to_ixi_labels",
    "tre_mm",
]
