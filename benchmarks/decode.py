"""Decode benchmark script: the same measurement as `loopcoder bench decode` (see its --help).

python benchmarks/decode.py --batches 1,32 --contexts 512,2048
"""

import sys

from loopcoder.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "decode", *sys.argv[1:]]))
