"""``python -m vidssl``: the same as the ``vidssl`` command."""

import sys

from vidssl.cli import main

if __name__ == "__main__":
    sys.exit(main())
