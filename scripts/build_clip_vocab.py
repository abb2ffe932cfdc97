"""Build sdlora/tokenizer/{vocab.json,merges.txt} from open-clip-torch's BPE file.

The real CLIP tokenizer ships on the model hub, which we cannot reach. open-clip-torch (on PyPI) ships
OpenAI's original `bpe_simple_vocab_16e6.txt.gz`; the Hugging Face vocab.json/merges.txt are a pure
function of it (OpenAI's SimpleTokenizer builds its vocabulary exactly this way), so we rebuild them here.

Usage: pip install --no-deps open-clip-torch && python scripts/build_clip_vocab.py
"""

import gzip
import importlib.util
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "sdlora" / "tokenizer"
# OpenAI's SimpleTokenizer keeps the first 49152 - 256 - 2 merges (the rest of the file is unused).
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable-unicode table (GPT-2 BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def main() -> None:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open-clip-torch is not installed: pip install --no-deps open-clip-torch")
    bpe_path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    OUT.mkdir(parents=True, exist_ok=True)
    ids = {tok: i for i, tok in enumerate(vocab)}
    (OUT / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {OUT}")


if __name__ == "__main__":
    main()
