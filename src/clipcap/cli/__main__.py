"""`python -m clipcap.cli` (what torchrun launches): the `clipcap` command."""

import sys

from . import main

sys.exit(main())
