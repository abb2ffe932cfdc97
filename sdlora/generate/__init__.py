"""Rendering: diffusers pipelines with samplers and LoRA files switched by weight, A1111 prompt syntax and PNG
metadata, labelled grids, and LoRAs fused into a base model.
"""
