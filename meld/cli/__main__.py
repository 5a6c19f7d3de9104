"""``python -m meld.cli``: the ``meld`` command."""

import sys

from meld.cli import main

sys.exit(main())
