"""cloudckpt: PyTorch checkpoints on cloud object storage."""
