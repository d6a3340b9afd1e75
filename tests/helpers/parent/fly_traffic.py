"""The Fly Machines API emulators the behavioural suite ran on (``tests/conftest.py``'s
``_fly`` factory adds each one it starts), so that ``tests/test_fly_conformance.py``, which
runs after every other test, can check every request FlyBackend sent them against Fly's
published OpenAPI document. Nothing here imports flame.
"""

from __future__ import annotations

from typing import Any

#: every ``FlyMachinesEmulator`` started by the ``_fly`` backend factory, in order; their
#: ``requests`` stay readable after they are closed
EMULATORS: list[Any] = []
