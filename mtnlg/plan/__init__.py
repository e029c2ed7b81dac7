"""``mtnlg plan``: the layout planner. For a model and a cluster it enumerates the (tp, pp, dp, micro batch, ZeRO,
sequence parallelism, recompute) layouts Megatron's rules allow, predicts each one's memory per GPU (the memory
model of ``mtnlg.training.memory``) and step time (``cost``), and ranks those that fit by throughput.

Only the CLI imports this package.
"""
