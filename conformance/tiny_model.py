"""Write a tiny random-weight chat model that a real vLLM serves (no download possible here).

Run with the conformance venv's Python (it has torch, transformers, tokenizers):
``python tiny_model.py OUT_DIR``. A byte-level BPE tokenizer is trained on a few generated
lines, and a Qwen2 model with random weights is saved next to it (about 1 MB): vLLM loads it
like any Hugging Face model, and its answers are random text, which a conformance test wants
(a 200 that lacks what was asked is a real case, not a staged one). Head dim 64 (the CPU
attention backend refuses 16). The chat template renders text parts, tools and tool calls in
the Hermes style that vLLM's ``hermes`` tool parser reads.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these functions:\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call><|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n"
    "{%- if message.content is string %}{{ message.content }}"
    "{%- elif message.content %}{%- for part in message.content %}"
    "{%- if part.type == 'text' %}{{ part.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message.tool_calls %}{%- for call in message.tool_calls %}"
    "<tool_call>{\"name\": \"{{ call.function.name }}\", \"arguments\": "
    "{{ call.function.arguments | tojson }}}</tool_call>{%- endfor %}{%- endif %}"
    "<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]


def corpus(n: int = 4000) -> list[str]:
    rng = random.Random(0)
    text = ("the a model gateway request answer image audio tool call weather city json "
            "hello world what is said here invoice number number of get_weather arguments "
            "name value true false null user assistant system")
    words = text.split()
    lines = []
    for _ in range(n):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 20))))
        lines.append(json.dumps({"name": rng.choice(words), "arguments": {
            rng.choice(words): rng.choice(words), "n": rng.randint(0, 999)}}))
    return lines


def main(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=2000, special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None,
                                   additional_special_tokens=SPECIAL[1:])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    torch.manual_seed(0)
    eos = fast.convert_tokens_to_ids("<|im_end|>")
    cfg = Qwen2Config(vocab_size=len(fast), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      eos_token_id=eos, bos_token_id=None,
                      pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
                      torch_dtype="bfloat16")
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=eos)
    model.save_pretrained(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
