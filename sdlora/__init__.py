"""sdlora: train Stable Diffusion LoRAs, export them in the community format, generate with them."""

__version__ = "0.1.0"
