"""The VALL-E model: embeddings, sequence assembly, heads, losses."""
