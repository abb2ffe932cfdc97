"""The training schedule: `due_after` says what follows each optimizer step (log, LoRA file, checkpoint, validation,
samples). It is pure, so a whole run's schedule is read here without a model."""

from sdlora.config import load_config
from sdlora.train.recipe import due_after


def cfg_of(*overrides, max_steps=12):
    return load_config(None, [f"train.max_train_steps={max_steps}", "train.save_every_n_epochs=0", *overrides])


def schedule(cfg, steps_per_epoch, stop_at=None):
    """Each step's `Due`, walked as the training loop does: steps counted from 1, epochs from 0, the last step of
    each epoch flagged, the run ending at train.max_train_steps or at a stop asked for after step `stop_at`."""
    dues, epoch, step = {}, 0, 0
    while True:
        for in_epoch in range(1, steps_per_epoch + 1):
            step += 1
            final = step >= cfg.train.max_train_steps or step == stop_at
            dues[step] = due_after(step, epoch, in_epoch == steps_per_epoch, final, cfg)
            if final:
                return dues
        epoch += 1


def steps_where(dues, what):
    return [step for step, due in dues.items() if getattr(due, what)]


def lora_files(dues):
    return {step: due.lora_name for step, due in dues.items() if due.lora_name}


def test_loss_logged_every_n_steps_and_at_the_last():
    dues = schedule(cfg_of("train.log_every_n_steps=4", max_steps=10), steps_per_epoch=3)
    assert steps_where(dues, "log") == [4, 8, 10]


def test_only_the_last_step_is_final_and_saves_the_final_name_with_a_checkpoint():
    cfg = cfg_of('train.output_name="cat"', "data.validation_split=0.25", 'sample.prompts=["a cat"]', max_steps=7)
    dues = schedule(cfg, steps_per_epoch=5)
    assert steps_where(dues, "final") == [7]
    assert lora_files(dues) == {7: "cat"}
    assert steps_where(dues, "checkpoint") == [7]
    last = dues[7]
    assert last.validate and last.sample and last.log


def test_a_stop_asked_for_saves_as_the_end_does():
    dues = schedule(cfg_of("data.validation_split=0.25", 'sample.prompts=["a cat"]'), steps_per_epoch=5, stop_at=3)
    assert list(dues) == [1, 2, 3]
    assert dues[3].final and dues[3].lora_name == "lora" and dues[3].checkpoint
    assert dues[3].validate and dues[3].sample


def test_per_epoch_lora_files_take_kohyas_names():
    dues = schedule(cfg_of("train.save_every_n_epochs=2", max_steps=13), steps_per_epoch=3)
    # Epochs end after steps 3, 6, 9, 12; every second one saves, numbered from 1; step 13 is the last.
    assert lora_files(dues) == {6: "lora-000002", 12: "lora-000004", 13: "lora"}
    assert steps_where(dues, "checkpoint") == [6, 12, 13]


def test_per_step_lora_files_take_kohyas_names():
    dues = schedule(cfg_of('train.output_name="cat"', "train.save_every_n_steps=4", max_steps=10), steps_per_epoch=3)
    assert lora_files(dues) == {4: "cat-step00000004", 8: "cat-step00000008", 10: "cat"}


def test_one_lora_file_per_step_when_epoch_and_step_saves_meet():
    cfg = cfg_of("train.save_every_n_epochs=1", "train.save_every_n_steps=2", max_steps=8)
    dues = schedule(cfg, steps_per_epoch=4)
    assert lora_files(dues) == {2: "lora-step00000002", 4: "lora-000001", 6: "lora-step00000006", 8: "lora"}


def test_checkpoints_between_lora_files():
    dues = schedule(cfg_of("train.checkpoint_every_n_steps=3", max_steps=10), steps_per_epoch=4)
    assert steps_where(dues, "checkpoint") == [3, 6, 9, 10]
    assert lora_files(dues) == {10: "lora"}


def test_validation_at_each_epochs_end_or_every_n_steps():
    dues = schedule(cfg_of("data.validation_split=0.25", max_steps=10), steps_per_epoch=3)
    assert steps_where(dues, "validate") == [3, 6, 9, 10]
    dues = schedule(cfg_of("data.validation_split=0.25", "train.validate_every_n_steps=4", max_steps=10),
                    steps_per_epoch=3)
    assert steps_where(dues, "validate") == [4, 8, 10]


def test_no_validation_without_validation_images():
    dues = schedule(cfg_of("train.validate_every_n_steps=2", max_steps=10), steps_per_epoch=3)
    assert steps_where(dues, "validate") == []


def test_samples_every_n_steps_every_n_epochs_and_at_the_end():
    prompts = 'sample.prompts=["a cat"]'
    assert steps_where(schedule(cfg_of(prompts, max_steps=10), steps_per_epoch=3), "sample") == [10]
    dues = schedule(cfg_of(prompts, "sample.every_n_steps=4", max_steps=10), steps_per_epoch=3)
    assert steps_where(dues, "sample") == [4, 8, 10]
    dues = schedule(cfg_of(prompts, "sample.every_n_epochs=2", max_steps=13), steps_per_epoch=3)
    assert steps_where(dues, "sample") == [6, 12, 13]


def test_no_samples_without_prompts():
    dues = schedule(cfg_of("sample.every_n_steps=1", "sample.every_n_epochs=1", max_steps=6), steps_per_epoch=2)
    assert steps_where(dues, "sample") == []
