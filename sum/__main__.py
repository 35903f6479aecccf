"""``python -m sum <stage> ...``: the same command line as ``sumseg`` (`sum.cli`)."""

import sys

from sum.cli import main

sys.exit(main())
