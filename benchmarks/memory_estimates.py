"""Print the memory planner's estimates for the reference settings as a Markdown table (for RESULTS.md).

    python benchmarks/memory_estimates.py
"""

import dataclasses

from sdlora.config import load_config
from sdlora.train.plan import GB, estimate, trace

ROWS = [  # (label, overrides)
    ("batch 1", ["train.batch_size=1"]),
    ("batch 4", ["train.batch_size=4"]),
    ("batch 4, gradient checkpointing", ["train.batch_size=4", "train.gradient_checkpointing=true"]),
    ("batch 1, TE outputs cached", ["train.batch_size=1", "data.cache_text_encoder_outputs=true"]),
    ("batch 1, TE cached, checkpointing",
     ["train.batch_size=1", "data.cache_text_encoder_outputs=true", "train.gradient_checkpointing=true"]),
    ("batch 1, TE trained", ["train.batch_size=1", "lora.train_text_encoder=true"]),
]


def main() -> None:
    print("| model | resolution | setting (fp16, rank 4, UNet attention, cached latents) | estimate GB |")
    print("|---|---|---|---|")
    for model, resolution in (("sd15", 512), ("sdxl", 1024)):
        common = [f'model.base_model="{model}"', 'data.dirs=["unused"]', f"data.resolution={resolution}",
                  "train.mixed_precision=fp16", "lora.rank=4", "lora.alpha=4", "lora.train_text_encoder=false"]
        traced = {}
        for label, overrides in ROWS:
            cfg = load_config(None, common + overrides)
            key = (cfg.lora.train_text_encoder,)
            traced[key] = traced.get(key) or trace(cfg)
            total = estimate(dataclasses.replace(cfg), traced[key]).total / GB
            print(f"| {model} | {resolution} | {label} | {total:.2f} |")


if __name__ == "__main__":
    main()
