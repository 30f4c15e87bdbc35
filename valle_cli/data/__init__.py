"""Datasets: the on-disk format written by `valle prepare` and read by training."""
