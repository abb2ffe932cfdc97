"""Weights & Biases through accelerate's trackers (train.log_with): an offline run holds what TensorBoard and
validation.csv hold, the command line prints none of wandb's lines, no wandb process outlives its run, and a missing
wandb is one line naming the key and the fix."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdlora.config import load_config
from sdlora.errors import ConfigError, TrainingError
from sdlora.train.recipe import train
from sdlora.ui.kohya_import import translate
from tests.test_train import make_cfg

BLOCK = 32768  # LevelDB's log block, which the transaction log keeps


def offline_env(root: Path) -> dict[str, str]:
    """wandb with no network and no login, all of its files under `root` (none in the home folder)."""
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(root / "dir"), "WANDB_CONFIG_DIR": str(root / "config"),
            "WANDB_CACHE_DIR": str(root / "cache"), "WANDB_DATA_DIR": str(root / "data")}


def services(pid: int) -> list[str]:
    """The wandb-core processes serving process `pid` (wandb starts one per process, with --pid naming it)."""
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in listing.splitlines() if "wandb-core" in line and re.search(rf"--pid {pid}\b", line)]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """Offline wandb for a run in this process; afterwards its service is stopped, and the test fails if it stays."""
    import wandb

    for name, value in {**offline_env(tmp_path / "wandb-home"), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    yield
    wandb.teardown()
    assert services(os.getpid()) == []


def records(run_dir: Path) -> list:
    """The records of an offline run's transaction log (`run-<id>.wandb`), which wandb 0.31 has no public reader of
    (its own is in the Go service): LevelDB's log format after a 7-byte ":W&B" header, 32 KiB blocks of chunks, each
    with a 7-byte header (CRC, length, type: 1 full, 2 first, 3 middle, 4 last; 0 is a block's zero padding), the
    chunks of one record joined making a serialized wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    [log] = run_dir.glob("run-*.wandb")
    data = log.read_bytes()
    assert data[:4] == b":W&B"
    found, pos, chunk = [], 7, b""
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if room < 7 or kind == 0:
            pos += room
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            found.append(record)
            chunk = b""
    return found


def offline_run(out: Path) -> dict:
    """The one offline run under `<output_dir>/wandb`: its project and name, config, and history {key: {step: value}}
    (an image's key holding its fields as a dict)."""
    [run_dir] = (out / "wandb").glob("offline-run-*")
    run, config, history = None, {}, {}
    for record in records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key, *field = item.nested_key if item.nested_key else [item.key]
                value = json.loads(item.value_json)
                if field:
                    row.setdefault(key, {})["/".join(field)] = value
                else:
                    row[key] = value
            step = row.pop("_step")
            for key, value in row.items():
                if not key.startswith("_"):
                    history.setdefault(key, {})[step] = value
    assert run is not None
    return {"project": run.project, "name": run.display_name, "config": config, "history": history}


def tensorboard(folder: Path) -> tuple[dict, dict]:
    """Scalars {tag: {step: value}} and images {tag: [step, ...]} of TensorBoard's events in `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={SCALARS: 0, IMAGES: 0})
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()[SCALARS]}
    images = {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()[IMAGES]}
    return scalars, images


@pytest.mark.smoke
def test_all_logs_the_same_values_to_tensorboard_and_an_offline_wandb_run(dataset, tmp_path, offline_wandb):
    out = tmp_path / "run"
    train(make_cfg(dataset, out, "train.log_with=all", "train.wandb_run_name=tiny-run", "train.max_train_steps=4",
                   "data.validation_split=0.34", "train.validate_every_n_steps=2",
                   'sample.prompts=["zkstyle, a cat --d 3"]', "sample.steps=2", "sample.every_n_steps=3"))
    run = offline_run(out)
    scalars, images = tensorboard(out / "logs" / "sdlora")
    assert (run["project"], run["name"]) == ("sdlora", "tiny-run")
    assert run["config"]["train.log_with"] == "all" and run["config"]["lora.rank"] == 4
    assert sorted(scalars["loss"]) == [1, 2, 3, 4]
    for tag in ("loss", "lr", "skipped_steps", "val_loss"):  # TensorBoard keeps float32
        assert run["history"][tag] == pytest.approx(scalars[tag], rel=1e-6), tag
    with open(out / "validation.csv", newline="") as f:
        validation = {int(row["step"]): float(row["val_loss"]) for row in csv.DictReader(f)}
    assert sorted(validation) == [0, 2, 4] and run["history"]["val_loss"] == pytest.approx(validation, rel=1e-6)
    assert images == {"samples/00": [3, 4]}
    wandb_samples = run["history"]["samples/00"]
    assert sorted(wandb_samples) == [3, 4]
    [png] = wandb_samples[3]["filenames"]
    assert next((out / "wandb").glob("offline-run-*/files")).joinpath(png).is_file()


# A run that fails mid-training leaves its wandb run open until the process exits: wandb < 0.21 printed its sync
# notes then, after sdlora's one-line error.
@pytest.mark.parametrize("ending", ["finished", "failed"])
def test_wandb_alone_from_the_command_line_prints_none_of_its_lines_nor_outlives_the_run(dataset, tmp_path, ending):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # nothing silences wandb but sdlora
    env.update(offline_env(tmp_path / "wandb-home"))
    failing = ["train.learning_rate=1e30", "train.max_nonfinite_steps=1"] if ending == "failed" else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdlora.cli", "train", str(make_config_file(dataset, tmp_path, out)),
         "train.log_with=wandb", "train.wandb_project=my-loras", *failing],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == (1 if failing else 0), stderr[-2000:]
    assert services(proc.pid) == []
    lines = [line.replace(str(tmp_path), "<tmp>") for text in (stdout, stderr) for line in re.split(r"[\r\n]", text)
             if line.strip()]
    ours = [line for line in lines if re.fullmatch(r"(\[RANK 0\] )?wandb run: .*", line)]
    assert ours == ["[RANK 0] wandb run: <tmp>/run/wandb"]  # offline, the run's folder stands for its link
    assert not [line for line in lines if re.search(r"wandb|W&B", line, re.I) and line not in ours]
    if failing:
        assert stderr.splitlines()[-1].startswith("sdlora: error: loss or gradients were NaN/Inf")
    assert not list((out / "logs").rglob("events.out.tfevents.*"))  # no TensorBoard unless asked
    run = offline_run(out)
    assert run["project"] == "my-loras" and sorted(run["history"]["loss"]) == ([1] if failing else [1, 2])


def make_config_file(dataset: Path, tmp_path: Path, out: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(
        f'[model]\nbase_model = "tiny-sd15"\n[data]\ndirs = ["{dataset.as_posix()}"]\nresolution = 64\n'
        'min_bucket_reso = 64\nmax_bucket_reso = 64\n[lora]\nrank = 2\n'
        f'[train]\noutput_dir = "{out.as_posix()}"\nmax_train_steps = 2\nbatch_size = 2\nlog_every_n_steps = 1\n'
        "save_every_n_epochs = 0\nreport = false\n")
    return path


@pytest.mark.parametrize("log_with", ["wandb", "all"])
def test_a_missing_wandb_is_one_line_naming_the_key_and_the_fix(dataset, tmp_path, monkeypatch, log_with):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as when it is not installed
    with pytest.raises(TrainingError) as e:
        train(make_cfg(dataset, tmp_path / "run", f"train.log_with={log_with}"))
    assert str(e.value) == f"train.log_with = \"{log_with}\" needs wandb: pip install 'sdlora[wandb]'"


def test_log_with_and_the_project_name_are_checked_when_the_config_loads():
    for override, key in (("train.log_with=mlflow", "train.log_with"), ('train.wandb_project="a/b"', "wandb_project"),
                          ('train.wandb_project=""', "wandb_project")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(None, [override])


def test_kohya_logging_keys_map_and_the_api_key_is_left_out_with_why():
    result = translate({"log_with": "all", "log_tracker_name": "styles", "wandb_run_name": "v1",
                        "wandb_api_key": "0123456789abcdef", "logging_dir": "logs"})
    t = result.config.train
    assert (t.log_with, t.wandb_project, t.wandb_run_name) == ("all", "styles", "v1")
    [unmapped] = result.unmapped
    assert unmapped.startswith("wandb_api_key: ") and "wandb login" in unmapped and "WANDB_API_KEY" in unmapped
    assert "0123456789abcdef" not in result.report()  # a secret is not echoed
