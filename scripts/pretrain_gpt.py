"""Entry point for launchers: `deepspeed --num_gpus N scripts/pretrain_gpt.py --config RUN.yaml [--set k=v]`
(also torchrun, or plain python). Same as `mtnlg train`."""

import sys

from mtnlg.cli import run

if __name__ == "__main__":
    run(["train", *sys.argv[1:]])
