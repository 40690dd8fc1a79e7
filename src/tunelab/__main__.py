"""``python -m tunelab`` (also what ``torchrun -m tunelab`` runs)."""

import sys

from tunelab.cli import main

sys.exit(main())
