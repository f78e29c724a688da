"""megatron-core backend: model built from an HF config, HF <-> Megatron weights, vocab-parallel
log-probs, distributed checkpoints. Imported only when `actor.backend=megatron` or a conversion
tool runs; everything CPU-specific lives in `cpu_compat.py`."""
