"""Calibration data sources and statistics collectors."""

from __future__ import annotations

import json

import torch
from torch import nn

from compressor import api
from compressor.calib.data import calibration_set, evaluation_set, read_documents
from compressor.calib.stats import collect_inputs


def test_collectors_match_direct_computation():
    torch.manual_seed(0)
    q, k = nn.Linear(16, 8), nn.Linear(16, 4)
    down = nn.Linear(8, 16)
    batches = [torch.randn(3, 5, 16) for _ in range(4)]
    with collect_inputs({"qk": [q, k], "down": [down]}, {"hessian", "absmax", "mean"},
                        hessian_dtype=torch.float64) as stats, torch.no_grad():
        for x in batches:
            q(x), k(x)
            down(torch.relu(q(x)) * 0 + q(x))
    x = torch.cat([b.reshape(-1, 16) for b in batches]).double()
    torch.testing.assert_close(stats["qk"]["hessian"].result(), x.T @ x / x.shape[0])
    assert stats["qk"]["hessian"].result().dtype == torch.float64
    torch.testing.assert_close(stats["qk"]["absmax"].result(), x.abs().amax(0).float())
    torch.testing.assert_close(stats["qk"]["mean"].result(), x.mean(0).float())
    # q ran twice per batch (two hooks' worth of inputs) — the down group saw q's outputs once per batch
    assert stats["down"]["hessian"].count == 4 * 15
    # The collectors are forward pre-hooks, and they are gone once the block is left.
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in (q, k, down))


def test_collectors_hook_while_collecting_only():
    q = nn.Linear(4, 4)
    with collect_inputs({"q": [q]}, {"hessian"}):
        assert len(q._forward_pre_hooks) == 1
    assert not q._forward_pre_hooks


def test_calibration_sampling_is_seeded_and_non_overlapping(tiny_llama, text_file):
    tok = api.load(str(tiny_llama)).tokenizer
    a = calibration_set(str(text_file), tok, samples=8, seq_len=32, seed=1)
    b = calibration_set(str(text_file), tok, samples=8, seq_len=32, seed=1)
    c = calibration_set(str(text_file), tok, samples=8, seq_len=32, seed=2)
    assert a.input_ids.shape == (8, 32)
    assert torch.equal(a.input_ids, b.input_ids) and a.sha256 == b.sha256
    assert a.sha256 != c.sha256
    rows = {tuple(r.tolist()) for r in a.input_ids}
    assert len(rows) == 8


def test_data_sources_give_the_same_documents(tmp_path, tiny_llama):
    docs = ["first document text", "second one here", "third"]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs}), tmp_path / "d.parquet")
    from datasets import Dataset

    Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "ds"))
    for source in ("d.jsonl", "d.parquet", "ds"):
        assert read_documents(tmp_path / source, "body") == docs, source
    (tmp_path / "d.txt").write_text("plain text\n\nwith paragraphs")
    assert read_documents(tmp_path / "d.txt") == ["plain text\n\nwith paragraphs"]


def test_chat_template_renders_messages(tmp_path, tiny_llama):
    tok = api.load(str(tiny_llama)).tokenizer
    rows = [{"messages": [{"role": "user", "content": "hello there " * 20},
                          {"role": "assistant", "content": "general reply " * 20}]}] * 20
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    plain = calibration_set(str(tmp_path / "chat.jsonl"), tok, samples=4, seq_len=32)
    chat = calibration_set(str(tmp_path / "chat.jsonl"), tok, samples=4, seq_len=32, chat_template=True)
    assert plain.sha256 != chat.sha256
    from compressor.calib.data import token_stream

    stream = token_stream(tmp_path / "chat.jsonl", tok, chat_template=True)
    assert (stream == tok.convert_tokens_to_ids("<s>")).sum() == 40  # one per message


def test_evaluation_windows_are_the_first_ones(tiny_llama, text_file):
    tok = api.load(str(tiny_llama)).tokenizer
    ev = evaluation_set(str(text_file), tok, windows=3, window_len=40)
    stream = tok(text_file.read_text(), add_special_tokens=False)["input_ids"]
    assert ev.input_ids.flatten().tolist() == stream[:120]


def test_reference_text_split_never_overlaps(monkeypatch, tmp_path):
    """The reference-text splitter on a fake source: every 10th article held out, disjoint."""
    from compressor.models import assets

    source = tmp_path / "summaries.json"
    source.write_text(json.dumps({f"T{i}": {"extract": f"article {i}"} for i in range(35)}))
    monkeypatch.setattr(assets, "locate", lambda item, log=None: source)
    calib = assets.resolve_text("wiki", "calib")
    evald = assets.resolve_text("wiki:eval", "calib")
    c = [json.loads(line)["title"] for line in calib.read_text().splitlines()]
    e = [json.loads(line)["title"] for line in evald.read_text().splitlines()]
    assert e == ["T9", "T19", "T29"]
    assert len(c) == 32 and not set(c) & set(e)
    meta = json.loads((calib.parent / "meta.json").read_text())
    assert meta["splits"]["eval"]["documents"] == 3


def test_token_stream_is_cached_and_checked(tmp_path, tiny_llama, text_file, monkeypatch):
    """The second tokenization of the same data with the same tokenizer is read from the cache
    (the tokenizer is not called); a damaged cache file is recomputed, changed data misses it."""
    from compressor.calib import data

    tok = api.load(str(tiny_llama)).tokenizer
    first = data.token_stream(text_file, tok)
    files = list((tmp_path / "cache" / "tokens").glob("*.safetensors"))
    assert len(files) == 1
    calls = []
    backend_encode = type(tok)._encode_plus

    def counting(self, *args, **kwargs):
        calls.append(1)
        return backend_encode(self, *args, **kwargs)

    monkeypatch.setattr(type(tok), "_encode_plus", counting)
    again = data.token_stream(text_file, tok)
    assert torch.equal(first, again) and again.dtype == torch.long and not calls
    raw = bytearray(files[0].read_bytes())
    raw[-3] ^= 0xFF  # one token changed on disk: not what was stored
    files[0].write_bytes(bytes(raw))
    assert torch.equal(data.token_stream(text_file, tok), first) and len(calls) == 1
    assert torch.equal(data.token_stream(text_file, tok), first) and len(calls) == 1  # rewritten, read back
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text() + " more")
    data.token_stream(other, tok)
    assert len(calls) == 2 and len(list((tmp_path / "cache" / "tokens").glob("*.safetensors"))) == 2


def test_calibration_from_several_sources(tmp_path, tiny_llama, text_file, jsonl_file):
    """'a,b' calibrates on the two token streams one after another; a shortfall names both."""
    from compressor.calib.data import token_stream
    from compressor.errors import CompressorError

    tok = api.load(str(tiny_llama)).tokenizer
    both = calibration_set(f"{text_file},{jsonl_file}", tok, samples=4, seq_len=32)
    stream = torch.cat([token_stream(text_file, tok), token_stream(jsonl_file, tok)])
    windows = stream[: stream.numel() // 32 * 32].view(-1, 32)
    assert all(any(torch.equal(row, w) for w in windows) for row in both.input_ids)
    assert both.describe()["source"] == f"{text_file},{jsonl_file}"
    count = stream.numel() // 32
    calibration_set(f"{text_file},{jsonl_file}", tok, samples=count, seq_len=32)  # needs the second source
    assert count > token_stream(text_file, tok).numel() // 32
    import pytest

    with pytest.raises(CompressorError, match="austen:train") as info:
        calibration_set(f"{text_file},{jsonl_file}", tok, samples=count + 1, seq_len=32)
    assert str(text_file) in info.value.message and str(jsonl_file) in info.value.message


def test_austen_train_leaves_out_the_held_out_novel(tmp_path, monkeypatch):
    from compressor.models import assets

    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    root = assets.text_dir("austen")
    root.mkdir(parents=True)
    docs = [{"title": f"{book} {i}", "text": f"{book} chapter {i}"} for book in ("emma", "persuasion", "emma2")
            for i in range(3)]
    (root / "eval.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "calib.jsonl").write_text("\n")
    (root / "meta.json").write_text(json.dumps({"name": "austen", "splits": {}}))
    train = assets.resolve_text("austen:train", "calib")
    titles = [json.loads(line)["title"] for line in train.read_text().splitlines()]
    assert titles == [f"{b} {i}" for b in ("emma", "emma2") for i in range(3)]
    assert assets.resolve_text("austen", "calib") == root / "calib.jsonl"
    from compressor.errors import CompressorError
    import pytest

    with pytest.raises(CompressorError, match="wiki:calib, wiki:eval"):
        assets.resolve_text("wiki:train", "calib")
