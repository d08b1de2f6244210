"""Scanner-simulating augmentation: drawn acquisition parameters, the TorchIO reference chain, the fused fast path."""
