"""``mtnlg finetune``: fine-tune a BERT encoder on a downstream task (Megatron-LM's ``tasks/main.py``) in any
tp x pp x dp layout, from a pretrained checkpoint of any layout or an ``import-hf`` output (docs/bert.md).

    run.finetune(cfg, "mnli", "train.tsv", ["dev_matched.tsv"], pretrained="runs/bert", epochs=3)

- ``weights``: the pretrained encoder into the task model (its pretraining heads dropped, the task head new);
- ``predict``: the task head's logits of every example of a set, from the training engine (any layout);
- ``run``: the epochs, the evaluation after each, ``<checkpoint.save>/task_results.json``;
- ``commands``: the ``finetune`` subcommand.

Above training: it imports training, checkpoint, model and tasks; nothing below imports it.
"""
