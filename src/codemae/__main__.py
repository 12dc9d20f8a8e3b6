"""``python -m codemae``: the ``codemae`` command."""

import sys

from codemae.cli import main

sys.exit(main())
