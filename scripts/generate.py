"""Entry point for launchers (`deepspeed --num_gpus N scripts/generate.py --checkpoint DIR ...`): `mtnlg generate`."""

import sys

from mtnlg.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
