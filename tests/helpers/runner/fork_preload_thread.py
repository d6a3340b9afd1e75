"""Starts a thread when imported: a fork server that preloads this must not fork."""

import threading

_stop = threading.Event()
threading.Thread(target=_stop.wait, name="preloaded-thread", daemon=True).start()
