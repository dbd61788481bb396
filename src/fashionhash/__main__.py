"""``python -m fashionhash ...``: the console script, for when only an interpreter path is known
(e.g. a benchmark that runs training in child processes)."""
import sys

from fashionhash.cli import main

sys.exit(main())
