"""``python -m dinov3_geo.cli``: the ``dinov3geo`` command."""
import sys

from dinov3_geo.cli import main

sys.exit(main())
