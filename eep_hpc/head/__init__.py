"""The head: the coordinator of ranks (coordinator.py and the parts it holds) and the head process (main.py)."""
