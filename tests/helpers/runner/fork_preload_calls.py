"""Calls a pool when imported: a fork server that preloads this must refuse it."""

import flame

flame.call(flame.Pool("fork-preload-calls", max=1, backend="local"), abs, -1)
