"""The benchmark runs the real training path on the tiny model here; GPU numbers live in benchmarks/RESULTS.md."""

import dataclasses
import json

import pytest

from sdlora.train import bench


def changed(a, b):
    return [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def test_sweep_changes_one_factor_at_a_time():
    for cuda in (False, True):
        reference, *variants = bench.settings("sweep", cuda)
        assert reference.mixed_precision == ("fp16" if cuda else "no")
        for i, v in enumerate(variants):
            # One factor from the reference, or from an earlier setting (fp8 storage needs checkpointing).
            assert min(len(changed(v, earlier)) for earlier in [reference, *variants[:i]]) == 1
        assert {v.quantize_base for v in variants} == {"none", "fp8", "nf4"}
    cpu, gpu = bench.settings("sweep", False), bench.settings("sweep", True)
    on_gpu = [dataclasses.replace(c, mixed_precision="fp16") for c in cpu]  # the CPU runs fp32
    gpu_only = [v for v in gpu if v not in on_gpu]
    assert len(gpu) == len(cpu) + len(gpu_only) and [v for v in gpu if v in on_gpu] == on_gpu
    assert [changed(v, gpu[0]) for v in gpu_only] == [  # bf16, NHWC, compilation, host syncs: GPU only
        ["mixed_precision"], ["channels_last"], ["compile"], ["compile", "compile_mode"], ["log_every_n_steps"]]


def test_counted_flops_follow_the_setting(sd15_path):
    base = bench.Setting(mixed_precision="no")
    flops = bench.training_flops(str(sd15_path), base, 64)
    wider = bench.training_flops(str(sd15_path), dataclasses.replace(base, rank=64), 64)
    recomputed = bench.training_flops(str(sd15_path), dataclasses.replace(base, gradient_checkpointing=True), 64)
    assert 0 < flops < wider  # a bigger adapter costs more
    assert recomputed > flops  # checkpointing runs parts of the forward twice
    preserved = bench.training_flops(str(sd15_path), dataclasses.replace(base, preservation_weight=1.0), 64)
    forward = (recomputed - flops) / 1  # checkpointing recomputes about one forward pass
    assert preserved == pytest.approx(2 * flops + forward, rel=0.05)  # one more pass with gradients, one without


def test_bench_prints_one_json_line_per_setting(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    args = ["--model", "tiny-sd15", "--plan", "reference", "--steps", "2", "--out", str(out)]
    assert bench.main(args) == 0
    assert bench.main(args) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(printed) == 2 and out.read_text().splitlines() == [json.dumps(r) for r in printed]
    row = printed[0]
    assert row["model"] == "tiny-sd15" and row["batch_size"] == 4 and row["steps_timed"] == 2
    assert row["images_per_s"] > 0 and row["step_s_median"] > 0 and row["tflop_per_image"] > 0
    assert row["quantize_base"] == "none" and row["base_weights_gb"] > 0
    assert row["mfu"] is None  # no GPU peak to compare against on a CPU
