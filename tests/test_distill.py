"""`compress distill`: the fused KL equals the textbook one (values and gradients); the data order
is a pure function of the position, shared by any number of processes; distillation lowers the
student's KL to the teacher; a SIGKILLed run resumes to the identical loss curve and bytes; two
gloo processes match one; sliced (SliceGPT, MoDeGPT) students heal in their own class; the
artifact feeds `quantize` and `pack`; bad input is one line before any work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor import api
from compressor.distill.data import TrainingWindows
from compressor.distill.kl import KLSettings, chunked_metrics, fused_kl, reference_kl
from compressor.errors import CompressorError
from conftest import make_gemma3, make_llama
from helpers import assert_cli_error, cli

SETTINGS = {"tokens": 32 * 4 * 16, "seq_len": 32, "batch_size": 4, "lr": 1e-4, "warmup": 0.25, "eval_windows": 4,
            "save_every": 4}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny Llama with confident predictions (a scaled output head), so KL is far from zero."""
    from transformers import AutoModelForCausalLM

    path = make_llama(tmp_path_factory.mktemp("teacher"), layers=2, tied=False)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory, text_file) -> Path:
    out = tmp_path_factory.mktemp("student") / "minitron"
    api.prune(str(teacher), "minitron", out, None, {"ffn": 64, "hidden": 48}, calib=str(text_file), samples=8,
              seq_len=32)
    return out


def run(teacher, student, text_file, out, **overrides) -> dict:
    settings = {**SETTINGS, **{k: v for k, v in overrides.items() if k not in ("resume", "restart")}}
    return api.distill(str(teacher), str(student), str(text_file), out, settings, eval_data=str(text_file),
                       resume=overrides.get("resume", False), restart=overrides.get("restart", False))


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("settings", [KLSettings(), KLSettings(temperature=2.0, chunk=7), KLSettings(top_k=5, chunk=9),
                                      KLSettings(student_softcap=3.0, teacher_softcap=5.0, temperature=1.5, chunk=11)])
def test_fused_kl_matches_full_logits_in_value_and_gradient(settings):
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(37, 16, dtype=torch.float64, generator=g, requires_grad=True)
    ws = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    ht, wt = torch.randn(37, 24, dtype=torch.float64, generator=g), torch.randn(50, 24, dtype=torch.float64, generator=g)
    fused = fused_kl(hs, ws, ht, wt, settings, torch.float64)
    (2.5 * fused).backward()
    grads = hs.grad.clone(), ws.grad.clone()
    hs.grad = ws.grad = None
    reference = reference_kl(hs, ws, ht, wt, settings)
    (2.5 * reference).backward()
    assert torch.allclose(fused.double(), reference, rtol=1e-5)
    assert torch.allclose(grads[0], hs.grad, atol=1e-6) and torch.allclose(grads[1], ws.grad, atol=1e-6)


def test_chunked_metrics_match_full_logits():
    g = torch.Generator().manual_seed(1)
    hs, ws, ht, wt = (torch.randn(*s, generator=g) for s in ((30, 8), (40, 8), (30, 12), (40, 12)))
    targets = torch.randint(0, 40, (30,), generator=g)
    nll, kl = chunked_metrics(hs, ws, ht, wt, targets, KLSettings(chunk=7))
    log_ps, log_pt = (hs @ ws.T).log_softmax(-1), (ht @ wt.T).log_softmax(-1)
    assert abs(nll - float(-log_ps.gather(1, targets[:, None]).sum())) < 1e-3
    assert abs(kl - float((log_pt.exp() * (log_pt - log_ps)).sum())) < 1e-3


# ---------------------------------------------------------------- the data order


def test_data_order_is_a_function_of_position_and_splits_across_processes():
    data = TrainingWindows(torch.arange(10 * 4).view(10, 4), [], seed=3)
    one = [data.batch(step, micro, 0, 4, 2, 1) for step in range(3) for micro in range(2)]
    two = [torch.cat([data.batch(step, micro, rank, 2, 2, 2) for rank in range(2)])
           for step in range(3) for micro in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    seen = torch.cat(one)[:, 0] // 4
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:20].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:20])  # each epoch its own permutation


# ---------------------------------------------------------------- runs


def test_distillation_lowers_kl_and_writes_an_artifact_quantize_and_pack_accept(teacher, student, text_file, tmp_path):
    out = tmp_path / "distilled"
    result = run(teacher, student, text_file, out)
    assert result["eval"]["kl"] < 0.9 * result["eval_before"]["kl"]
    assert result["steps"] == 16 and result["tokens"] == SETTINGS["tokens"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "distilled" and manifest["metrics"]["tokens"] == SETTINGS["tokens"]
    assert manifest["method"]["teacher"]["sha256"] == api.load(str(teacher)).source_hash
    assert len(manifest["calibration"]["sha256"]) == 64 and manifest["metrics"]["steps"] == 16
    assert api.verify(out)["ok"]
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 48
    api.quantize(str(out), "rtn", tmp_path / "q", {"group_size": 16})
    packed = api.pack(str(out), tmp_path / "p")
    assert packed["output"] == str(tmp_path / "p")


_KILL = """
import os, signal
from compressor import api
from compressor.distill.checkpoint import TrainingCheckpoint
save = TrainingCheckpoint.save
def save_then_die(self, state, *args):
    save(self, state, *args)
    if {kill} and state["step"] == 8:
        os.kill(os.getpid(), signal.SIGKILL)
TrainingCheckpoint.save = save_then_die
api.distill({teacher!r}, {student!r}, {data!r}, {out!r}, {settings!r}, eval_data={data!r}, resume={resume})
"""


def test_sigkilled_distillation_resumes_with_the_same_loss_curve_and_bytes(teacher, student, text_file, tmp_path):
    run(teacher, student, text_file, tmp_path / "clean")
    out = tmp_path / "killed"
    code = _KILL.format(teacher=str(teacher), student=str(student), data=str(text_file), out=str(out), kill=True,
                        resume=False, settings=SETTINGS)
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    with pytest.raises(CompressorError, match="other settings"):
        run(teacher, student, text_file, out, resume=True, lr=1e-3)
    with pytest.raises(CompressorError, match="interrupted distillation of this output exists"):
        run(teacher, student, text_file, out)
    run(teacher, student, text_file, out, resume=True)
    build = lambda d: json.loads((d / "build.json").read_text())  # noqa: E731
    assert build(out)["losses"] == build(tmp_path / "clean")["losses"]
    files = lambda d: {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.name != "build.json"}  # noqa: E731
    assert files(out) == files(tmp_path / "clean")


def _torchrun(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--no-python", sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def test_two_gloo_processes_match_one_and_resume_on_two(teacher, student, text_file, tmp_path):
    one = run(teacher, student, text_file, tmp_path / "one", batch_size=4)
    settings = json.dumps({**SETTINGS, "batch_size": 2})
    code = (f"import json; from compressor import api; api.distill({str(teacher)!r}, {str(student)!r}, "
            f"{str(text_file)!r}, {str(tmp_path / 'two')!r}, json.loads({settings!r}), eval_data={str(text_file)!r})")
    two = _torchrun(code)
    assert two.returncode == 0, two.stderr[-3000:]
    losses = json.loads((tmp_path / "two" / "build.json").read_text())["losses"]
    assert len(losses) == len(one["losses"])
    assert max(abs(a - b) for a, b in zip(losses, one["losses"])) < 1e-4 * max(one["losses"])
    # checkpointed on two processes, SIGKILLed, resumed on two: the same loss curve
    settings = {**SETTINGS, "batch_size": 2}
    for resume in (False, True):
        code = _KILL.format(teacher=str(teacher), student=str(student), data=str(text_file), out=str(tmp_path / "k"),
                            kill=not resume, resume=resume, settings=settings)
        proc = _torchrun(code)
        assert (proc.returncode == 0) == resume, proc.stderr[-3000:]
    assert json.loads((tmp_path / "k" / "build.json").read_text())["losses"] == losses


def test_fsdp_on_two_gloo_processes_resumes_matches_one_and_saves_a_loadable_student(teacher, student, text_file,
                                                                                      tmp_path):
    """The student sharded over 2 processes (FSDP2, gradient checkpointing on), SIGKILLed after its
    step-8 checkpoint (gathered full tensors) and resumed sharded: the loss curve and the trained
    weights of one unsharded process, written as an ordinary artifact plain transformers loads."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    one = run(teacher, student, text_file, tmp_path / "one")
    settings = {**SETTINGS, "batch_size": 2, "fsdp": True, "gradient_checkpointing": True}
    for resume in (False, True):
        proc = _torchrun(_KILL.format(teacher=str(teacher), student=str(student), data=str(text_file),
                                      out=str(tmp_path / "two"), kill=not resume, resume=resume, settings=settings))
        assert (proc.returncode == 0) == resume, proc.stderr[-3000:]
    build = json.loads((tmp_path / "two" / "build.json").read_text())
    assert build["fsdp"] and build["processes"] == 2
    assert len(build["losses"]) == len(one["losses"])
    assert max(abs(a - b) for a, b in zip(build["losses"], one["losses"])) < 1e-4 * max(one["losses"])
    assert abs(build["evals"][-1]["ppl"] - one["eval"]["ppl"]) < 1e-3 * one["eval"]["ppl"]
    sharded, plain = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "two", tmp_path / "one"))
    assert sharded.keys() == plain.keys()
    assert max(float((sharded[k] - plain[k]).abs().max()) for k in plain) < 1e-4
    assert api.verify(tmp_path / "two")["ok"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "two").config.hidden_size == 48


@pytest.mark.parametrize("method, options", [("slicegpt", {"sparsity": 0.25}), ("modegpt", {"sparsity": 0.25})])
def test_sliced_students_heal_in_their_own_class(method, options, teacher, text_file, tmp_path):
    pruned = tmp_path / method
    api.prune(str(teacher), method, pruned, None, options, calib=str(text_file), samples=16, seq_len=32)
    out = tmp_path / "healed"
    result = run(teacher, pruned, text_file, out)
    assert result["eval"]["kl"] < result["eval_before"]["kl"]
    assert json.loads((out / "config.json").read_text()) == {**json.loads((pruned / "config.json").read_text()),
                                                              "dtype": "float32"}
    assert torch.isfinite(api.load(str(out)).model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_text_sampled_from_the_teacher_joins_the_training_data(teacher, student, text_file, tmp_path):
    from compressor.distill.data import teacher_samples

    model = api.load(str(teacher)).model
    first, again = (teacher_samples(model, 1, 100, 32, seed=3) for _ in range(2))
    assert first.shape == (4, 32) and torch.equal(first, again) and (first[:, 0] == 1).all()
    assert not torch.equal(first, teacher_samples(model, 1, 100, 32, seed=4))
    out = tmp_path / "generated"
    result = run(teacher, student, text_file, out, tokens=32 * 4 * 3, generate_data=32 * 8)
    sources = json.loads((out / "manifest.json").read_text())["calibration"]["sources"]
    assert sources[-1]["ref"].startswith("teacher samples") and sources[-1]["windows"] == 8
    assert result["steps"] == 3


def test_hidden_state_loss_and_gradient_checkpointing(teacher, student, text_file, tmp_path):
    plain = run(teacher, student, text_file, tmp_path / "plain", tokens=32 * 4 * 3)
    checkpointed = run(teacher, student, text_file, tmp_path / "ckpt", tokens=32 * 4 * 3, gradient_checkpointing=True)
    assert max(abs(a - b) for a, b in zip(plain["losses"], checkpointed["losses"])) < 1e-5
    hidden = run(teacher, student, text_file, tmp_path / "hidden", tokens=32 * 4 * 3, hidden_weight=1.0)
    assert all(h > p for h, p in zip(hidden["losses"], plain["losses"]))  # the MSE term adds to the KL


# ---------------------------------------------------------------- bad input


def _cli(teacher, student, data, out, *extra):
    return cli("distill", "--teacher", teacher, "--student", student, "--data", data, "--eval-data", data, "-o", out,
               "--seq-len", "32", "--batch-size", "4", "--eval-windows", "4", *extra)


def test_bad_input_is_one_line_before_any_work(teacher, student, text_file, tmp_path):
    out = tmp_path / "out"
    other = make_llama(tmp_path / "other-vocab", layers=1, vocab=300)
    assert_cli_error(_cli(teacher, other, text_file, out), "vocabulary")
    short = tmp_path / "short.txt"
    short.write_text("just a few words of text")
    assert_cli_error(_cli(teacher, student, short, out), "one step needs")
    assert_cli_error(_cli(teacher, student, text_file, out, "--tokens", "10"), "less than one optimizer step")
    assert_cli_error(_cli(teacher, student, text_file, out, "--tokens", "lots"), "cannot read --tokens")
    assert_cli_error(_cli(teacher, student, text_file, out, "--temperature", "0"), "temperature")
    assert_cli_error(_cli(teacher, student, text_file, out, "--resume"), "no interrupted distillation")
    gemma = make_gemma3(tmp_path / "gemma")
    assert_cli_error(_cli(teacher, gemma, text_file, out, "--hidden-weight", "1"), "hidden-state loss needs")
    wide = make_llama(tmp_path / "wide", layers=1, hidden=96)
    assert_cli_error(_cli(teacher, wide, text_file, out, "--hidden-weight", "1"), "hidden-state loss needs")
    assert not out.exists()


def test_compiling_a_modegpt_student_allows_one_variant_per_block_width(teacher, text_file, tmp_path):
    """Sliced blocks differ in width; with dynamo's default limit of 8 variants the later blocks of a
    30-block student would run uncompiled (the 20M-token MoDeGPT run on the H200 hit it)."""
    from compressor.distill.trainer import allow_block_shapes

    pruned = tmp_path / "modegpt"
    api.prune(str(teacher), "modegpt", pruned, None, {"sparsity": 0.25}, calib=str(text_file), samples=16, seq_len=32)
    loaded = api.load(str(pruned))
    blocks = list(loaded.adapter.blocks(loaded.model))
    shapes = {tuple(p.shape for p in b.parameters()) for b in blocks}
    assert len(shapes) > 1  # MoDeGPT keeps a different number of neurons per block
    before = torch._dynamo.config.recompile_limit
    try:
        torch._dynamo.config.recompile_limit = 8
        assert allow_block_shapes(blocks) == len(shapes) + 8
        assert torch._dynamo.config.recompile_limit == len(shapes) + 8
    finally:
        torch._dynamo.config.recompile_limit = before
