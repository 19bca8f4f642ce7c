"""``python -m ase_petft.cli``: the ``petft`` command."""

import sys

from . import main

sys.exit(main())
