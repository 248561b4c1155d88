"""``python -m xenicorn``: the same as the ``xenicorn`` command."""
import sys

from .cli import main

sys.exit(main())
