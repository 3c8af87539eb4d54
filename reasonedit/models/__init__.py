"""Models: the reasoner, the packed generator, the VAE, and ReasonEditModel that holds them.

Imported lazily, so that reading configs does not load torch and transformers.
"""

_EXPORTS = {
    "ReasonEditModel": "model", "Reasoner": "reasoner", "PackedQwenImageTransformer": "generator",
    "GeneratorSample": "generator", "PatchCodec": "vae", "QwenImageVAE": "vae", "ModelConfig": "config",
    "PackedAttention": "attention", "TokenLayout": "attention", "Span": "attention",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
