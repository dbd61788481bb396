"""``python -m fashionhash.serving RUN_DIR [--index PATH] [--host H] [--port P] [--token T]``:
the same as ``fashionhash serve``."""
import sys

from fashionhash.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
