"""``python -m csm.cli <command> ...`` — the same dispatcher as the ``csm-mlx`` console script."""

import sys

from . import main

sys.exit(main())
