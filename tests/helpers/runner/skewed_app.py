"""An application whose runner claims other versions of flame, Python and cloudpickle.

Imported as a runner's app, it replaces ``flame._wire.local_versions`` in that runner, so its
handshake reports a version skew, as a runner built from another image would. Imported
anywhere else (the tests read :data:`SKEWED`), it changes nothing.
"""

import flame
from flame import _wire

SKEWED = {"flame": "0.0.0-skew", "python": "3.99", "cloudpickle": "0.0.1"}


def _skewed_versions() -> dict[str, str]:
    return dict(SKEWED)


if flame.parent() is not None:
    _wire.local_versions = _skewed_versions
