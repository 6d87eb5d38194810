"""Save the test suite's tiny random llama (tests/conftest.py) to a directory, for
I/O demonstrations that need a model but not good text (e.g. the 10,000-row table run).

    python benchmarks/make_tiny_model.py /tmp/tiny-llama
    cbgen run table.parquet --model /tmp/tiny-llama --dtype float32 ...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import build_tiny_llama, build_tiny_tokenizer  # noqa: E402


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer), tokenizer)
    model.save_pretrained(sys.argv[1])
    tokenizer.save_pretrained(sys.argv[1])
    print(f"wrote the tiny llama to {sys.argv[1]}")


if __name__ == "__main__":
    main()
