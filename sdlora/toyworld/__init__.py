"""The toy world: procedural captioned scenes, the base model pretrained on them, and the measurements of what a
LoRA trained on top of it draws.

No real Stable Diffusion weights can be downloaded here, so sdlora ships a tiny SD1-shaped model that it trained
itself on this world (`toy-sd15`). Because every scene is generated from its caption, the world is also the
ground truth: an evaluator that reads colour, position, shape and style from pixels checks generated images
against the prompts that made them.
"""
