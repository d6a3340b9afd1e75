"""``python -m flame runner`` (also the console script ``flame runner``), and
``python -m flame zygote``, ``ProcessBackend``'s fork server (``flame.backends._zygote``)."""

from __future__ import annotations

import sys

USAGE = """usage: flame runner

Starts a flame runner. A runner is booted by a flame backend, which sets FLAME_PARENT;
it is not meant to be started by hand.
"""


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["runner"]:
        from ._child._main import main as runner_main

        runner_main()
        return
    if args[:1] == ["zygote"]:
        from .backends._zygote import main as zygote_main

        zygote_main()
        return
    sys.stderr.write(USAGE)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
