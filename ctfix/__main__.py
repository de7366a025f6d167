"""`python -m ctfix` is the same as the `ctfix` console script."""

import sys

from ctfix.cli import main

sys.exit(main())
