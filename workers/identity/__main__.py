"""``python -m workers.identity``: see :mod:`workers.identity.cli`."""

import sys

from .cli import main

sys.exit(main())
