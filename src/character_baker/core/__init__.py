"""Core layer: constitution, recipe config, run directories. Imports nothing of ours above it."""
