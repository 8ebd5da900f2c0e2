"""``python -m ranapass``: the command line (so that ``torchrun -m ranapass profile ...`` works)."""

import sys

from ranapass.cli import main

sys.exit(main())
