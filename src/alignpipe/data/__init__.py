"""Data sources: the built-in task, readers of user files and format conversion."""
