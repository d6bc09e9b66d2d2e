"""Trace datasets: the on-disk format, input records, tokenization and preprocessing."""
