"""mae_fast: fast masked autoencoders for Cell Painting microscopy."""

__version__ = "0.1.0"


def from_pretrained(name_or_path: str, **kwargs):
    """A model from a local folder or a Hugging Face Hub repo id (see `mae_fast.hub.from_pretrained`)."""
    from mae_fast.hub import from_pretrained as load

    return load(name_or_path, **kwargs)
