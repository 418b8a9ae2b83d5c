"""Execution of a Plan: stage meshes, schedules, exchange between stages, the pipeline runtime."""
