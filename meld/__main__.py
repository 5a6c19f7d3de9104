"""``python -m meld``: the ``meld`` command, for an environment whose scripts folder is not on PATH."""

import sys

from meld.cli import main

sys.exit(main())
