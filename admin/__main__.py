"""python -m admin: the operator's command line (admin/cli.py)."""
import sys

from admin.cli import main

sys.exit(main())
