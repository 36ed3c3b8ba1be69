"""embtables: compressed embedding tables for CTR training, export and serving."""


def load(path, device="cpu", backend="auto", verify=True):
    """The inference module of an export dir (see embtables.serving.inference.load)."""
    from embtables.serving.inference import load as _load  # lazy: `import embtables` stays light

    return _load(path, device=device, backend=backend, verify=verify)


def __getattr__(name):
    """CompressedEmbeddingBagCollection on first use, so `import embtables` does not import TorchRec."""
    if name == "CompressedEmbeddingBagCollection":
        from embtables.compressed_ebc import CompressedEmbeddingBagCollection

        return CompressedEmbeddingBagCollection
    raise AttributeError(f"module 'embtables' has no attribute {name!r}")
