"""hsfm-train: hyperspectral / optical-SAR foundation-model training.

``hsfm_train.load_pretrained(path)`` returns a ready backbone from an ``hsfm export`` directory."""


def __getattr__(name: str):
    # lazy, so that `import hsfm_train` (and the CLI's start-up) does not pull in torch
    if name == "load_pretrained":
        from hsfm_train.engine.export import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'hsfm_train' has no attribute {name!r}")
