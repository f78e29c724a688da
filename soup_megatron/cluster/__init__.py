"""`soup-megatron launch`: the job scripts of a run (sbatch templates in `templates/`) and their submission."""
