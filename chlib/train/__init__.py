"""Training layer: the training loop, k-fold production training, hyperparameter tuning."""
