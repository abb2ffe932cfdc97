"""Training: the recipe (`sdlora.train.recipe.train`) in named phases, and what it uses: the loss, checkpoints,
validation loss, the values read from the device at check points, the memory planner and the speed benchmark.

This file imports nothing: `sdlora --help` builds the benchmark's options from `sdlora.train.bench` without torch.
"""
