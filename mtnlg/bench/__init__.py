"""Benchmarks: ``mtnlg bench`` (training throughput and MFU vs the Hugging Face + DeepSpeed peer at one
rank and at dp=2, pipeline and tensor-parallel scaling; ``mtnlg.bench.runner``). The CLI registers it with
``mtnlg.bench.commands.add_commands``."""
