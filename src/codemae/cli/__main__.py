"""``python -m codemae.cli``: the ``codemae`` command."""

import sys

from codemae.cli import main

sys.exit(main())
