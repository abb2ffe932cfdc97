"""Validation loss: fixed images, timesteps and noise, so it is deterministic and comparable across steps."""

import csv

import pytest
from test_train import make_cfg

from sdlora.data.dataset import scan_dataset
from sdlora.errors import DatasetError
from sdlora.models.loading import load_base_model
from sdlora.train.loss import compute_loss
from sdlora.train.recipe import train
from sdlora.train.validation import best, prepare_validation, split_records, validation_loss


def test_split_is_seeded_disjoint_and_keeps_training_images(dataset):
    cfg = make_cfg(dataset, "unused", "data.validation_split=0.34")
    records = scan_dataset(cfg.data)
    train_part, held_out = split_records(records, cfg)
    assert len(held_out) == 2 and len(train_part) == 4
    assert not {r.path for r in train_part} & {r.path for r in held_out}
    assert [r.path for r in split_records(records, cfg)[1]] == [r.path for r in held_out]
    other_seed = make_cfg(dataset, "unused", "data.validation_split=0.34", "train.seed=7")
    assert {r.path for r in split_records(records, other_seed)[1]} != {r.path for r in held_out}
    with pytest.raises(DatasetError, match="validation_split.*leaves no training image"):
        split_records(records[:1], make_cfg(dataset, "unused", "data.validation_split=0.5"))


def test_validation_loss_is_deterministic(dataset, sd15_path):
    from diffusers import DDPMScheduler

    cfg = make_cfg(dataset, "unused", f'data.validation_dirs=["{dataset.as_posix()}"]')
    base = load_base_model(str(sd15_path))
    items = prepare_validation(split_records(scan_dataset(cfg.data), cfg)[1], base, cfg)
    scheduler = DDPMScheduler.from_config(base.scheduler_config)
    args = (items, base.unet, base.text_encoders, base.arch, scheduler, cfg.train, base.unet.dtype, compute_loss)
    base.unet.train()
    first = validation_loss(*args)
    assert first > 0 and validation_loss(*args) == first
    assert base.unet.training and not base.text_encoders[0].training  # each module's mode is restored


def test_validation_loss_falls_while_training_on_the_same_images(dataset, tmp_path):
    out = tmp_path / "run"
    train(make_cfg(dataset, out, f'data.validation_dirs=["{dataset.as_posix()}"]', "train.max_train_steps=30",
                   "train.validate_every_n_steps=10", "lora.rank=8", "lora.alpha=8"))
    with open(out / "validation.csv", newline="") as f:
        rows = [{"step": int(r["step"]), "epoch": int(r["epoch"]), "val_loss": float(r["val_loss"])}
                for r in csv.DictReader(f)]
    assert [r["step"] for r in rows] == [0, 10, 20, 30]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert best(rows)["step"] > 0 and best(rows)["val_loss"] == min(r["val_loss"] for r in rows[1:])
