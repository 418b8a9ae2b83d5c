"""Placement search: balanced partition (GA + Kernighan-Lin), pipeline ordering, layer assignment, planners."""
