"""Entry point for launchers (`deepspeed --num_gpus N scripts/generate.py --checkpoint DIR ...`): `mtnlg generate`."""

import sys

from mtnlg.cli import run

if __name__ == "__main__":
    run(["generate", *sys.argv[1:]])
