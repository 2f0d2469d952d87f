"""Tiny random models and data built in-process: no hub, no downloads, seconds to run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

WORDS = ("the of and to in is was for on as with by at from his her an that which model river city "
         "music war king church school state team film album song island village species family "
         "government century north south east west first second new old great small large").split()


def make_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences = []
    while n_words > 0:
        k = rng.randint(5, 14)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n_words -= k
    return " ".join(sentences)


def make_tokenizer(directory: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([make_text(3000, s) for s in range(4)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    fast.save_pretrained(directory)
    return fast


def make_llama(directory: Path, layers: int = 2, hidden: int = 64, intermediate: int = 128, vocab: int = 256,
               tied: bool = True, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    make_tokenizer(directory)
    return directory


def make_gemma3(directory: Path, layers: int = 2) -> Path:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              max_position_embeddings=512, sliding_window=16, bos_token_id=1, eos_token_id=2,
                              pad_token_id=0)
    Gemma3ForCausalLM(config).eval().save_pretrained(directory, safe_serialization=True)
    make_tokenizer(directory)
    return directory


def make_qwen3_moe(directory: Path, layers: int = 2, experts: int = 8) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_experts=experts, num_experts_per_tok=2, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    Qwen3MoeForCausalLM(config).eval().save_pretrained(directory, safe_serialization=True)
    make_tokenizer(directory)
    return directory


@pytest.fixture(autouse=True, scope="session")
def quiet_transformers():
    """What `compress`'s main() does before running the app: no transformers progress bars or logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@pytest.fixture(autouse=True)
def isolated_cache(request, tmp_path, monkeypatch):
    """Tests never touch the user's asset cache, except `slow` tests on the real reference
    assets, which fetch into it (idempotently) as a user would."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("tiny-llama"), layers=3)


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    return make_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory) -> Path:
    return make_qwen3_moe(tmp_path_factory.mktemp("tiny-moe"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(make_text(20000, seed=7))
    return path


@pytest.fixture(scope="session")
def jsonl_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.jsonl"
    with open(path, "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": make_text(300, seed=100 + i)}) + "\n")
    return path


@pytest.fixture
def without_compressed_tensors(monkeypatch):
    """As on a host where compressed-tensors is not installed: importing it fails."""
    import sys

    from compressor.formats import activations, bitpack

    for name in [n for n in sys.modules if n == "compressed_tensors" or n.startswith("compressed_tensors.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    bitpack._library_unpack.cache_clear()
    activations._library.cache_clear()
    yield
    bitpack._library_unpack.cache_clear()
    activations._library.cache_clear()


@pytest.fixture
def fake_wiki(tmp_path, monkeypatch):
    """A `wiki` asset already in a per-test cache (slow tests too): synthetic articles, nothing downloaded."""
    from compressor.models import assets

    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    root = assets.text_dir("wiki")
    root.mkdir(parents=True)
    docs = [{"title": f"article {i}", "text": make_text(150, seed=500 + i)} for i in range(40)]
    for split in ("calib", "eval"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "meta.json").write_text(json.dumps({"name": "wiki", "splits": {}}))
    return root
