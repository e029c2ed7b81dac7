"""Entry point for launchers (`deepspeed --num_gpus N scripts/evaluate.py --checkpoint DIR ...`): `mtnlg evaluate`."""

import sys

from mtnlg.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
