"""Registration of scans from files (the ``adreg-register`` and ``adreg-apply`` commands), one
module per step of the data flow: ``loading`` (files to normalised arrays on the fixed grid) ->
``affine`` (optional affine stage) -> ``deformable`` (instance optimisation of a stationary
velocity, or a network's field) -> ``transform`` (the map in world mm, its inverse) ->
``transform_io`` (fields on disk, ITK's convention too) and ``metrics``; ``pipeline`` runs these
for one pair, ``cohort`` for a pair list, ``commands`` parses the arguments.

A saved registration in one call::

    from adreg_jax.registration import load_transform
    transform = load_transform("results/")          # an adreg-register --out folder
    warped = transform.warp(image, affine)           # image on the moving grid -> fixed grid
    moving_points = transform.map_points(fixed_points)
    fixed_points = transform.inverted().map_points(moving_points)   # with --inverse
"""

from adreg_jax.registration.transform import Grid, Transform
from adreg_jax.registration.transform_io import load_transform, save_transform

__all__ = ["Grid", "Transform", "load_transform", "save_transform"]
