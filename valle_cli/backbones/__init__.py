"""Backbones: the transformer stacks the VALL-E model runs on (plugins in the valle.backbones group)."""
