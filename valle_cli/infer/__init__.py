"""Inference: KV-cached AR decoding, NAR passes, samplers."""
