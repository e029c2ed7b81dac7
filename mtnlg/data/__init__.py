"""Data: tokenizers, Megatron indexed datasets, preprocessing, the default corpus, GPT samples.

- ``tokenizer``: ``load_tokenizer``, ``train_tokenizer`` (byte-level BPE with <|endoftext|>)
- ``indexed``: ``IndexedDataset`` / ``IndexedDatasetWriter`` (PREFIX.bin + PREFIX.idx)
- ``readers``: the input formats (.jsonl/.txt/.parquet, saved Hugging Face datasets and .arrow), in chunks
- ``preprocess``: ``preprocess`` (inputs -> indexed, K workers), ``merge``
- ``corpus``: ``ensure_default_data`` (Python stdlib docstrings, offline)
- ``gpt_dataset``: ``build_datasets``, ``build_tokenizer`` (what the trainer calls)
- ``t5_span_corruption``, ``t5_dataset``: T5's span corruption and fine-tuning pairs (``build_t5_sources``)
- ``commands``: the ``mtnlg tokenizer|preprocess|merge-data|corpus`` subcommands
"""
