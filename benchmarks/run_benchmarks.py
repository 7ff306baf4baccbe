#!/usr/bin/env python
"""Run the benchmark suite as a script (same code as ``streamtag bench``)."""

import sys

from streamtag.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
