"""``python -m fxdp ...``: see :mod:`fxdp.cli`."""
import sys

from fxdp.cli import main

if __name__ == "__main__":
    sys.exit(main())
