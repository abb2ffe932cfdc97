"""Base models: loading a diffusers folder, a single-file checkpoint or an embedded model, the architecture table,
the diffusers <-> LDM names, the CLIP tokenizer, quantized storage, and meta-device models built from configs.

Package modules are imported by name (`sdlora.models.loading`); this file imports nothing, so that `sdlora doctor`
can read `sdlora.models.clip_tokenizer` without loading torch.
"""
