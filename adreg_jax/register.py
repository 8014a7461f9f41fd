"""``python -m adreg_jax.register``: the ``adreg-register`` command, which lives in
``adreg_jax.registration.commands`` (this module is kept so that old imports keep working)."""

import sys

from adreg_jax.registration.commands import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
