"""benchmarks/lora_quality.py: every row is a valid config, and the README's table is what it writes."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("lora_quality", REPO / "benchmarks" / "lora_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_row_is_a_valid_config_of_the_demo(script):
    from sdlora.config import load_config

    for _, overrides in script.ROWS:
        load_config(script.CONFIG, overrides)


def row(name: str, style: float) -> dict:
    scores = {"colour": 1.0, "position": 0.75, "shape": 0.5, "style": style}
    return {"row": name, "config": "(demo config)", "steps": 150, "train_s": 60.0, "file_kb": 300.0,
            "trainable_parameters": 1000, "by_weight": {"0": {**scores, "style": 0.0}, "0.5": scores, "1": scores},
            "base": scores, "bleed": 0.25, "weight0_equals_base": True, "images": 60, "seconds": 20.0, "extra": {}}


def test_table_replaces_the_readme_section_idempotently(script, tmp_path):
    rows = [row("LoRA", 0.9), {**row("DoRA", 0.95), "config": "lora.method=dora"}]
    table = script.markdown(rows, seeds=2)
    assert "| LoRA | demo config | 0.00 -> 0.90 -> 0.90 | 100% / 75% / 50% |" in table
    assert "| DoRA | `lora.method=dora` |" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{script.START}\nold\n{script.END}\nafter\n")
    script.update_readme(readme, table)
    script.update_readme(readme, table)
    text = readme.read_text()
    assert text.count("| DoRA |") == 1 and "old" not in text and text.endswith(f"{script.END}\nafter\n")


def test_the_readme_holds_the_table(script):
    text = (REPO / "README.md").read_text()
    assert script.START in text and script.END in text
    section = text.split(script.START)[1].split(script.END)[0]
    assert all(f"| {name} |" in section for name, _ in script.ROWS)


def test_a_row_measured_again_replaces_its_record_and_keeps_the_others(script, tmp_path):
    record = tmp_path / "lora_quality.jsonl"
    first, second = script.ROWS[0][0], script.ROWS[1][0]
    record.write_text("".join(json.dumps(r) + "\n" for r in [row(second, 0.5), row(first, 0.1), row("gone", 0.3)]))
    merged = script.merge_record(record, [row(first, 0.9)])
    assert [r["row"] for r in merged] == [first, second]  # ROWS order; a row no longer in ROWS drops
    assert merged[0]["by_weight"]["1"]["style"] == 0.9 and merged[1]["by_weight"]["1"]["style"] == 0.5


def test_the_record_holds_every_row_and_the_readme_table_is_made_from_it(script):
    recorded = script.merge_record(script.RECORD, [])
    assert [r["row"] for r in recorded] == [name for name, _ in script.ROWS]
    section = (REPO / "README.md").read_text().split(script.START)[1].split(script.END)[0]
    assert section.strip() == script.markdown(recorded, seeds=2).strip()
