"""The activation store: TensorStore zarr3 arrays written from a device mesh (see arrays.py)."""
