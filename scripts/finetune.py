"""Entry point for launchers: `deepspeed --num_gpus N scripts/finetune.py --config RUN.yaml --task TASK
--train-data PATH --valid-data PATH[,PATH] --pretrained CKPT [--set k=v]` (also torchrun, or plain python).
Same as `mtnlg finetune`."""

import sys

from mtnlg.cli import run

if __name__ == "__main__":
    run(["finetune", *sys.argv[1:]])
