"""mae_fast: fast masked autoencoders for Cell Painting microscopy."""

__version__ = "0.1.0"
