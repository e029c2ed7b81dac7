"""Evaluation (perplexity, cloze, multiple choice, lm-evaluation-harness) and text generation."""
