"""Data stages: prompt sources and distillation pairs."""
