"""Plans made before a GPU is booked: per-GPU memory (memory.py) and GRPO vs SOUP step time (step_time.py)."""
