"""``python -m cloudckpt.cli``: the same as the ``cloudckpt`` console script."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
