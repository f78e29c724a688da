"""soup-megatron: SOUP (token-level single-sample mix-policy RL) post-training.

Data flow, one package per stage: data/ (prompts) -> history/ (historical checkpoints, prefixes)
-> rollout/ (continuations) -> reward.py -> algo/ (advantage, token-ratio loss) -> actor/ (update)
-> train/ (the loop of those stages, weight sync, history rotation, checkpoints). Beside the flow:
evaluate.py, experiments/ (study, benchmarks), planning/ (memory and step time before a GPU is booked).
"""

from transformers.utils import logging as _hf_logging

_hf_logging.disable_progress_bar()  # per-save shard bars would drown the run's own progress bar

from .log import setup_logging  # noqa: E402

setup_logging()  # the package's status lines and warnings go to stderr (rank 0), as its prints did
