"""``python -m streamattn``: the ``streamattn`` command line."""

import sys

from streamattn.cli import main

if __name__ == "__main__":
    sys.exit(main())
