"""The foundation layer: what every other part of robustmatrix stands on — component specs and the
registry, kwargs, code versions and cache keys, pass counting, datasets, architectures, the matrix
spec and device selection. It imports nothing else of ours; ``attacks/`` and ``defenses/`` import
only this layer."""
