"""ONNX export (`export.onnx_export`, needs torch) and the torch-free engine (`export.runtime`)."""
