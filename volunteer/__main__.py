"""`python -m volunteer` runs the CLI."""

import sys

from volunteer.cli import main

sys.exit(main())
