"""What lives on disk between runs: checkpoints, the trust checks on their stored configs, cached weights."""
