"""``python -m promptcache`` runs the command line (see :mod:`promptcache.cli`)."""

import sys

from .cli import main

sys.exit(main())
