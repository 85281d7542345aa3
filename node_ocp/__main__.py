"""``python -m node_ocp`` is the ``node-ocp`` command."""

import sys

from .cli import main

sys.exit(main())
