"""fedrec: privacy-first recommendation models; central, federated and deployed training.

The distribution installs two top-level packages: ``fedrec`` and ``privacy`` (DP and encryption,
usable without fedrec). ``privacy`` is a generic name: importing fedrec checks that the ``privacy``
package Python would import is the one installed beside it, and fails with a clear message if
another package of that name shadows it.
"""

import importlib.util as _importlib_util
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _check_privacy_package() -> None:
    expected = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "privacy")
    loaded = _sys.modules.get("privacy")
    if loaded is not None:
        origin = getattr(loaded, "__file__", None)
    else:
        spec = _importlib_util.find_spec("privacy")
        origin = spec.origin if spec is not None else None
    if origin is None:
        raise ImportError(
            f"fedrec: its 'privacy' package is missing (expected {expected}); reinstall fedrec (docs/install.md)"
        )
    if _os.path.dirname(_os.path.abspath(origin)) != expected:
        raise ImportError(
            f"fedrec: another package named 'privacy' ({origin}) shadows fedrec's own ({expected}); "
            "uninstall it (pip uninstall privacy) or remove it from PYTHONPATH (docs/install.md)"
        )


_check_privacy_package()
