"""Keeps secrets out of text that may reach a log line or an error message.

Backends quote what a platform answered (a Fly or Kubernetes error message), and a platform
may echo parts of the request, which carries the runner's ``FLAME_PARENT`` (and with it the
runner secret). :func:`scrub` replaces every registered value, in whole or any piece of
16 or more characters of it (an answer cut off in the middle of a value), with
``<hidden>``. The pool registers each booting runner's values (:func:`hide`) and drops them
once the runner is gone (:func:`forget`). API tokens are the backends' own business (they
strip them from what they quote).
"""

from __future__ import annotations

import threading

_MIN_PIECE = 16
_lock = threading.Lock()
_hidden: dict[object, tuple[str, ...]] = {}


def hide(key: object, *values: str) -> None:
    """Register values never to be shown (under ``key``, for :func:`forget`)."""
    kept = tuple(v for v in values if v and len(v) >= 8)
    with _lock:
        _hidden[key] = _hidden.get(key, ()) + kept


def forget(key: object) -> None:
    with _lock:
        _hidden.pop(key, None)


def scrub(text: str) -> str:
    """``text`` with every registered value, or piece of 16 or more characters of one,
    replaced by ``<hidden>``."""
    with _lock:
        values = [v for vs in _hidden.values() for v in vs]
    for v in values:
        if v in text:
            text = text.replace(v, "<hidden>")
        text = _hide_pieces(text, v)
    return text


def _hide_pieces(text: str, value: str) -> str:
    """Replace each maximal run of ``text`` that is a substring of ``value`` (16+ chars)."""
    if len(text) < _MIN_PIECE:
        return text
    grams = {value[i : i + _MIN_PIECE] for i in range(len(value) - _MIN_PIECE + 1)}
    out: list[str] = []
    i = start = 0
    while i <= len(text) - _MIN_PIECE:
        if text[i : i + _MIN_PIECE] not in grams:
            i += 1
            continue
        end = i + _MIN_PIECE
        while end < len(text) and text[i : end + 1] in value:
            end += 1
        out += [text[start:i], "<hidden>"]
        i = start = end
    out.append(text[start:])
    return "".join(out)
