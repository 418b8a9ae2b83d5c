"""Cost models: training.py (DT-FM communication cost, full step time, memory)."""
