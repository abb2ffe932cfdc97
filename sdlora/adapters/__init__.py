"""Adapters on the UNet and the text encoders: LoRA, DoRA and PiSSA through peft, AdaLoRA through peft's tuner, LoHa
and LoKr through peft's LyCORIS layers, one dispatcher over the methods, and LoRA files: reading any common format,
writing the community (kohya, LyCORIS) format, and the tools that work on files alone (merge, resize, extract).
"""
