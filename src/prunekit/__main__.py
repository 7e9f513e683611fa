"""`python -m prunekit ...` runs the prunekit command."""

import sys

from prunekit.cli import main

sys.exit(main())
