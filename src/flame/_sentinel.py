"""The "use the pool's default" marker for ``timeout`` (``None`` means "no limit")."""

from __future__ import annotations

from typing import Any, Final


class _Default:
    def __repr__(self) -> str:
        return "<pool default>"


DEFAULT: Final[Any] = _Default()
