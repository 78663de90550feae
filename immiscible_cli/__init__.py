"""immiscible: train diffusion and flow-matching models faster with immiscible noise assignment."""

__version__ = "0.1.0"
