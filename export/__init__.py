"""ONNX export of a trained checkpoint (needs torch); the engine that runs it is `vqwavenet`."""
