"""``python -m diagcompile ...``: the ``diagcompile`` command line (:mod:`diagcompile.cli`)."""

import sys

from diagcompile.cli import main

if __name__ == "__main__":
    sys.exit(main())
