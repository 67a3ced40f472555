"""diagcompile.export: torch.export (.pt2), ONNX and TensorRT for diagonal-sparse models."""

__all__: list[str] = []
