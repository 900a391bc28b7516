"""``python -m dynrank.train``: the same as the ``dynrank-train`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
