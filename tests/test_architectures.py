"""Every supported architecture goes through the calibrated pipeline and its artifact reloads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from compressor import api
from compressor.errors import CompressorError
from compressor.formats.artifact import load_tensors

sys.path.insert(0, str(Path(__file__).parent))
import recording_method  # noqa: E402
from conftest import make_tokenizer  # noqa: E402

recording_method.register()

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)


def _build(kind: str, directory: Path) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    configs = {
        "mistral": lambda: (tf.MistralConfig(**SMALL, sliding_window=32), tf.MistralForCausalLM),
        "qwen2": lambda: (tf.Qwen2Config(**SMALL, tie_word_embeddings=True), tf.Qwen2ForCausalLM),
        "qwen3": lambda: (tf.Qwen3Config(**SMALL, head_dim=16), tf.Qwen3ForCausalLM),
        "llama-untied": lambda: (tf.LlamaConfig(**SMALL, tie_word_embeddings=False), tf.LlamaForCausalLM),
    }
    config, cls = configs[kind]()
    cls(config).eval().save_pretrained(directory)
    make_tokenizer(directory)
    return directory


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3", "llama-untied"])
def test_architecture_round_trip(kind, tmp_path, text_file):
    src = _build(kind, tmp_path / kind)
    out = tmp_path / f"{kind}-q"
    api.quantize(str(src), recording_method.NAME, out, {"bits": 4, "group_size": 32, "sym": False},
                 calib=str(text_file), samples=4, seq_len=32)
    base, quant = api.load(str(src)).model, api.load(out).model
    ids = torch.randint(3, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = base(ids).logits, quant(ids).logits
    assert torch.isfinite(b).all() and not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9
    n_linear = 7 * SMALL["num_hidden_layers"]
    packed = [k for k in load_tensors(out) if k.endswith("weight_packed")]
    assert len(packed) == n_linear


def test_unsupported_architecture_lists_supported(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "g")
    with pytest.raises(CompressorError, match="unsupported architecture 'gpt2'.*llama.*qwen3"):
        api.load(str(tmp_path / "g"))
