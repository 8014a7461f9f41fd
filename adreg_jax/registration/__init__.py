"""Registration of scans from files (the ``adreg-register`` command), one module per step of the
data flow: ``loading`` (files to normalised arrays on the fixed grid) -> ``affine`` (optional
affine stage) -> ``deformable`` (instance optimisation of a stationary velocity, or a network's
field) -> ``transform_io`` (fields on disk) and ``metrics`` -> ``commands`` (argument parsing,
the command-line entry points).
"""
