"""The rank process: its message loop (process.py) and its side of the epoch protocol (epochs.py)."""
