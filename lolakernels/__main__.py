"""``python -m lolakernels ...``: the same as the ``lolakernels`` command."""
import sys

from .cli import main

sys.exit(main())
