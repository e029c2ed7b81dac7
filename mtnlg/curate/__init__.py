"""Corpus curation before preprocessing (``mtnlg curate``): exact and MinHash near-duplicate removal, Gopher and C4
quality rules, and n-gram decontamination against benchmark files; local processes or a Ray cluster.
See docs/curate.md."""
