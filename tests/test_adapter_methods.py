"""benchmarks/adapter_methods.py: the README's method comparison comes from real runs of the training path."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread_plain_kernels")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("adapter_methods", REPO / "benchmarks" / "adapter_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_method_of_the_table_is_a_valid_config(script):
    from sdlora.config import load_config

    for _, overrides in script.METHODS:
        load_config(None, ["lora.rank=4", *overrides])


def test_comparison_runs_training_and_fills_the_readme_table(script, tmp_path):
    rows = script.compare([("LoRA", []), ("DoRA", ["lora.method=dora"])], steps=2, work=tmp_path)
    lora, dora = rows
    assert dora["trainable_parameters"] > lora["trainable_parameters"] > 0  # DoRA adds a magnitude per output
    assert dora["file_kb"] > lora["file_kb"] > 0
    assert all(r["step_ms"] > 0 and r["val_loss_start"] > 0 and r["val_loss_end"] > 0 for r in rows)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{script.START}\nold\n{script.END}\nafter\n")
    table = script.markdown(rows, 2)
    script.update_readme(readme, table)
    script.update_readme(readme, table)  # idempotent
    text = readme.read_text()
    assert text.count("| DoRA |") == 1 and "old" not in text and text.endswith(f"{script.END}\nafter\n")
    assert f"{lora['trainable_parameters']:,}" in text


def test_the_readme_holds_the_table(script):
    text = (REPO / "README.md").read_text()
    assert script.START in text and script.END in text
    section = text.split(script.START)[1].split(script.END)[0]
    assert all(f"| {name} |" in section for name, _ in script.METHODS)
