"""diagcompile.passes: graph rewrites of sparse-marked linears and the ``diagcompile`` torch.compile backend."""

__all__: list[str] = []
