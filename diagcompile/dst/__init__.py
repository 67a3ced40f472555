"""diagcompile.dst: dynamic sparse training of diagonal-sparse layers."""

__all__: list[str] = []
