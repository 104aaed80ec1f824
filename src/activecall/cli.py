"""The ``active-call`` console script: ``twistd -n activecall`` with the
asyncio reactor (aiortc needs it) and no pid file, taking the same flags."""

from __future__ import annotations

import sys


def main(argv=None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    sys.argv = ["active-call", "--nodaemon", "--pidfile=", "--reactor=asyncio", "activecall", *args]
    from twisted.scripts.twistd import run

    run()


if __name__ == "__main__":
    main()
