"""On-disk formats: atomic artifact directories, the manifest, compressed-tensors packing."""
