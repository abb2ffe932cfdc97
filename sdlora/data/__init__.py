"""Training images: finding images and captions, buckets, augmentation, the doctor's checks, caches and batches.

This file imports nothing: `sdlora doctor` reads datasets without torch.
"""
