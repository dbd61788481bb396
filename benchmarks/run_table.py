"""The results table: a thin wrapper of ``fashionhash table`` (see :mod:`fashionhash.table`),
kept so that older notes' commands still work.

    python benchmarks/run_table.py --quick    # = fashionhash table --quick
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fashionhash.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["table", *sys.argv[1:]]))
