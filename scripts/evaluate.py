"""Entry point for launchers (`deepspeed --num_gpus N scripts/evaluate.py --checkpoint DIR ...`): `mtnlg evaluate`."""

import sys

from mtnlg.cli import run

if __name__ == "__main__":
    run(["evaluate", *sys.argv[1:]])
