"""``python -m pixcrawler`` and the ``pixcrawler`` console script.

The command line's modules (numpy, Pillow, urllib3, click) are imported here, inside the
handler for Ctrl-C: pressed while they load, it exits 130 with one line, as it does once
the command runs, not with a traceback through numpy's import.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        sys.exit(130)
    run()


if __name__ == "__main__":
    main()
