"""sdlora: train Stable Diffusion LoRAs, export them in the community format, generate with them."""

from sdlora import bnb_import

__version__ = "0.1.0"

bnb_import.hide()  # before any module here imports peft; see bnb_import
