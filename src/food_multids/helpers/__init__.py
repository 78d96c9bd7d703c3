"""Leaf helpers that import nothing of the project: metrics, progress bars, signal handling."""
