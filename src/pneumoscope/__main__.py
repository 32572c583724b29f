"""``python -m pneumoscope`` (also what ``torchrun -m pneumoscope train ...`` runs)."""

import sys

from pneumoscope.cli import main

sys.exit(main())
