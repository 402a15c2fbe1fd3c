"""`python -m hybridvit`: the `hybridvit` command."""
import sys

from .cli import main

sys.exit(main())
