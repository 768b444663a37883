"""vqwavenet: a batch-invariant VQ-VAE WaveNet speech codec that runs on onnxruntime (no torch)."""
