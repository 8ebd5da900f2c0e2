import sys

from ranapass.cli import main

sys.exit(main())
