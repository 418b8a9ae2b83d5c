"""Checkpoints: orbax train checkpoints (manager.py), re-partitioning between stage plans
(repartition.py) and Hugging Face import/export (hf.py)."""
