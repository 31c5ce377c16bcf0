"""`python -m autotinybert` (and `torchrun -m autotinybert`) run the command line."""

import sys

from .cli import main

sys.exit(main())
