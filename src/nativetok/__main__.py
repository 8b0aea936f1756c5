"""`python -m nativetok`: the `nativetok` command where no console script is installed."""

import sys

from nativetok.cli import main

sys.exit(main())
