"""The lm-eval bridge: the registered `compressor` model, local offline tasks, `compress eval --tasks`
giving the same numbers as `lm_eval --model compressor` and lm-eval's own `hf` model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import cli

pytest.importorskip("lm_eval")
TASK = "compressor_wiki_cloze"


def test_cloze_docs_are_deterministic_with_similar_length_choices(fake_wiki):
    from compressor.evaluation import local_tasks

    documents = local_tasks._documents("wiki")
    docs = local_tasks.cloze_docs(documents)
    assert docs == local_tasks.cloze_docs(documents) and len(docs) > 20
    for d in docs:
        gold = d["choices"][d["label"]]
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
        assert all(0.7 * len(gold) <= len(c) <= 1.3 * len(gold) for c in d["choices"])
        assert gold in documents[int(d["title"].split()[-1])]["text"]
    assert len({d["label"] for d in docs}) > 1  # the answer's position varies


def test_tokenizer_bos_resolution(tmp_path):
    from tokenizers import processors

    from compressor.evaluation.lm_eval_bridge import tokenizer_adds_bos
    from conftest import make_tokenizer

    tok = make_tokenizer(tmp_path)
    assert not tokenizer_adds_bos(tok)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tokenizer_adds_bos(tok)


def _lm_eval(model: str, model_args: str, limit: int):
    import lm_eval

    from compressor.evaluation import lm_eval_bridge  # registers `compressor`

    with lm_eval_bridge.offline():
        out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], limit=limit,
                                      task_manager=lm_eval_bridge.task_manager([TASK]), log_samples=False,
                                      bootstrap_iters=1000)
    return lm_eval_bridge.summarize(out, [TASK])["tasks"][TASK]


def test_compress_eval_tasks_equals_lm_eval_compressor_and_hf(tiny_llama, fake_wiki):
    r = cli("--json", "eval", tiny_llama, "--tasks", TASK, "--limit", "24", "--batch-size", "1")
    assert r.exit_code == 0, r.output
    ours = json.loads(r.stdout)
    row = ours["tasks"][TASK]
    assert row["samples"] == 24 and row["acc_stderr"] > 0
    settings = ours["settings"]
    assert settings["add_bos_token"] is False and settings["bos_from"] == "tokenizer"
    assert settings["chat_template"] is False and settings["kind"] == "hf"
    registered = _lm_eval("compressor", f"pretrained={tiny_llama}", 24)
    hf = _lm_eval("hf", f"pretrained={tiny_llama},device=cpu,dtype=float32", 24)
    for metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert row[metric] == registered[metric] == hf[metric], metric


def test_tasks_on_a_packed_artifact(tiny_llama, fake_wiki, tmp_path):
    """Run from the packed weights: the same accuracy as the unpacked bf16 model."""
    assert cli("pack", tiny_llama, "-o", tmp_path / "p", "--dtype", "bfloat16").exit_code == 0
    assert cli("unpack", tmp_path / "p", "-o", tmp_path / "u").exit_code == 0
    rows = []
    for path in (tmp_path / "p", tmp_path / "u"):
        r = cli("--json", "eval", path, "--tasks", TASK, "--limit", "12", "--bos")
        assert r.exit_code == 0, r.output
        rows.append(json.loads(r.stdout))
    assert rows[0]["settings"]["kind"] == "packed" and rows[0]["settings"]["bos_from"] == "argument"
    assert rows[0]["settings"]["add_bos_token"] is True
    assert rows[0]["tasks"][TASK]["acc"] == rows[1]["tasks"][TASK]["acc"]


def test_rolling_perplexity_task(tiny_llama, fake_wiki):
    r = cli("--json", "eval", tiny_llama, "--tasks", "compressor_wiki_ppl", "--limit", "3")
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)["tasks"]["compressor_wiki_ppl"]
    assert row["samples"] == 3 and 1 < row["byte_perplexity"] < 256 and row["word_perplexity"] > 1


def test_unknown_task_and_task_without_offline_data(tiny_llama, fake_wiki):
    r = cli("eval", tiny_llama, "--tasks", "no_such_task_xyz")
    assert r.exit_code == 2 and "unknown lm-eval task 'no_such_task_xyz'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("eval", tiny_llama, "--tasks", "hellaswag", "--limit", "2")
    assert r.exit_code == 2 and "'hellaswag' has no data available offline" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # a fresh interpreter indexing lm-eval's whole task catalogue: ~45 s
def test_lm_eval_command_line_with_compressor_registered(tiny_llama, fake_wiki, tmp_path):
    """`python -m compressor.lm_eval` is lm-eval's own CLI with `--model compressor` available."""
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "compressor.lm_eval", "run", "--model", "compressor", "--model_args",
           f"pretrained={tiny_llama}", "--tasks", TASK, "--limit", "24", "--output_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results*.json")).read_text())
    r = cli("--json", "eval", tiny_llama, "--tasks", TASK, "--limit", "24")
    assert results["results"][TASK]["acc,none"] == json.loads(r.stdout)["tasks"][TASK]["acc"]
