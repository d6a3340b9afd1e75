"""Preloaded by the fork server in ``test_fork_server``: notes the process that imported it."""

import os

IMPORTED_IN = os.getpid()
