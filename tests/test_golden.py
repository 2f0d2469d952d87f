"""Same results: every reference recipe gives byte-identical artifacts across refactors.

The hashes in golden_artifacts.json were written by this file (`python tests/test_golden.py
--write`) before the engine was restructured; a change that alters any artifact's bytes must be
deliberate, and then the file is regenerated with a note saying why. Floating-point results
depend on the torch build, so the comparison runs where torch and transformers are the versions
the hashes were made with, and is skipped with the reason elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
GOLDEN = HERE / "golden_artifacts.json"

# (name, command, method, options); every artifact is built from the same tiny model and text.
RECIPES = [
    ("rtn-w4g32-sym", "quantize", "rtn", {"bits": 4, "group_size": 32}),
    ("rtn-w3g32-asym", "quantize", "rtn", {"bits": 3, "group_size": 32, "sym": False}),
    ("gptq-w4g32-actorder", "quantize", "gptq", {"bits": 4, "group_size": 32, "act_order": True}),
    ("gptq-w4g32-asym", "quantize", "gptq", {"bits": 4, "group_size": 32, "sym": False}),
    ("awq-w4g32", "quantize", "awq", {"bits": 4, "group_size": 32, "grid": 5, "search_samples": 4}),
    ("awq+gptq-w4g32", "quantize", "awq+gptq", {"bits": 4, "group_size": 32, "grid": 5, "search_samples": 4,
                                                "act_order": True}),
    ("smoothquant+-w4g32", "quantize", "smoothquant+", {"bits": 4, "group_size": 32, "grid": 5,
                                                        "search_samples": 4}),
    ("smoothquant-w8a8", "quantize", "smoothquant", {"alpha": 0.5}),
    ("fp8-dynamic", "quantize", "fp8", {}),
    ("fp8-static", "quantize", "fp8", {"act_static": True}),
    ("slicegpt-per-block", "prune", "slicegpt", {"sparsity": 0.25}),
    ("slicegpt-global", "prune", "slicegpt", {"sparsity": 0.25, "rotation": "global"}),
    ("modegpt", "prune", "modegpt", {"sparsity": 0.25}),
]
CALIB = {"samples": 16, "seq_len": 64}


def versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}


def make_model(directory: Path) -> Path:
    """A tiny Llama whose weights come from our own seeded generator (not transformers' init)."""
    sys.path.insert(0, str(HERE))
    from conftest import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            values = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            param.copy_(1 + 0.1 * values if name.endswith("norm.weight") else 0.08 * values)
    model.save_pretrained(directory, safe_serialization=True)
    make_tokenizer(directory)
    return directory


def make_text(path: Path) -> Path:
    sys.path.insert(0, str(HERE))
    from conftest import make_text as words

    path.write_text(words(20000, seed=7))
    return path


def build(name: str, model: Path, text: Path, out: Path) -> dict[str, str]:
    from compressor import api

    _, command, method, options = next(r for r in RECIPES if r[0] == name)
    if command == "quantize":
        api.quantize(str(model), method, out, options, calib=str(text), **CALIB)
    else:
        options = dict(options)
        sparsity = options.pop("sparsity")
        api.prune(str(model), method, out, sparsity, options, calib=str(text), **CALIB)
    files = sorted(out.glob("*.safetensors")) + [out / "config.json"]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    return make_model(root / "model"), make_text(root / "calib.txt")


@pytest.mark.parametrize("name", [r[0] for r in RECIPES])
def test_artifact_bytes_match_the_stored_hashes(name, inputs, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    if golden["versions"] != versions():
        pytest.skip(f"hashes were made with {golden['versions']}, this is {versions()}")
    model, text = inputs
    assert build(name, model, text, tmp_path / name) == golden["artifacts"][name]


def write() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, text = make_model(root / "model"), make_text(root / "calib.txt")
        artifacts = {name: build(name, model, text, root / name) for name, *_ in RECIPES}
    GOLDEN.write_text(json.dumps({"versions": versions(), "artifacts": artifacts}, indent=2, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__" and "--write" in sys.argv:
    write()
