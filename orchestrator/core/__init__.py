"""The plain-PyTorch core: the round loop (loop.py), the cell builder (cell.py), supervised
training (training.py), checkpoints and bank files. No Ray, no MLflow, no argument parsing."""
