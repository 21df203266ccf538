"""``python -m jaxenc.export``: see :mod:`jaxenc.export.cli`."""

import sys

from jaxenc.export.cli import main

sys.exit(main())
