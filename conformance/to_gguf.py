"""Convert the tiny model to GGUF with llama.cpp's own converter: ``python to_gguf.py
LLAMA_CPP_SOURCE MODEL_DIR OUT``, run with the conformance venv's Python (torch, transformers).

The converter recognises a BPE tokenizer by hashing how it splits a test text and refuses
tokenizers it does not know; ours is trained at test time, so it is declared Qwen2-style
(byte-level BPE, as it is) instead.
"""

import runpy
import sys
from pathlib import Path

source, model, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path[:0] = [str(source), str(source / "gguf-py")]
from conversion import base  # noqa: E402 (llama.cpp's converter package, from the source)

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", "f32"]
runpy.run_path(str(source / "convert_hf_to_gguf.py"), run_name="__main__")
