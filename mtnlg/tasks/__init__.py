"""Downstream tasks of BERT fine-tuning (Megatron-LM's ``tasks/``): readers, features and metrics.

    task = get_task("mnli")
    train = task.read("glue/MNLI/train.tsv")
    labels = task.label_names(train)                     # fixed for mnli/qqp/race/squad, from the data otherwise
    feats = task.features(train, tokenizer, seq_length=128, labels=labels)   # dict of np.int64 arrays
    scores = task.metric(train, predictions)             # accuracy, F1, exact match ... (see each module)

One small module per task; ``TASKS`` (mtnlg.tasks.registry) maps the ``--task`` names to them.
"""
