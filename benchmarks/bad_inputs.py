"""The command × bad-input matrix: every cell runs `compress COMMAND ...` with one bad input and
must end in exit code 2, one `error:` line naming the problem and the fix, and no file changed
(every file of the workspace hashed before and after).

A cell is one line of `CELLS`: (command, bad input, arguments in the workspace). Commands that
land later (distill, ...) add their lines here; a (command, input) pair that cannot arise for a
command (a recipe key for `verify`) has no line. tests/test_bad_input_matrix.py runs every cell;
benchmarks/robustness.py counts them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from faults import synthetic_wiki  # noqa: E402
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
CAL = ["--samples", "4", "--seq-len", "32"]
EVAL = ["--texts", "wiki", "--windows", "2", "--window-len", "32"]


class Workspace:
    """Good and bad inputs under one directory, made once."""

    def __init__(self, root: Path):
        self.root = Path(root)
        r = self.root
        self.model, self.gpt2, self.nan, self.inf, self.big_tok = (r / "model", r / "gpt2", r / "nan", r / "inf",
                                                                    r / "mismatched-tokenizer")
        self.empty_dir, self.empty_file, self.text, self.missing = r / "empty", r / "empty.bin", r / "notes.txt", r / "nope"
        self.artifact, self.packed = r / "w4", r / "packed"
        self.recipe, self.recipe_unknown, self.recipe_bad_value = r / "ok.yaml", r / "unknown.yaml", r / "range.yaml"
        self.calib, self.out = r / "calib.txt", r / "out" / "x"
        # the scale work reads checkpoints lazily, shard by shard: one shard gone, one cut short
        self.sharded, self.missing_shard = r / "sharded", r / "missing-shard"
        self.truncated_shard = r / "truncated-shard"
        # mixed precision: a sensitivity pass, the same with its table damaged, and one of another model
        self.sens, self.sens_damaged, self.sens_other = r / "sens", r / "sens-damaged", r / "sens-other"
        os.environ["COMPRESSOR_CACHE"] = str(r / "cache")
        from compressor.cli import _quiet_libraries

        _quiet_libraries()  # as `compress` itself does before running a command
        if not (r / "ready").is_file():
            self._build()

    def _build(self) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_llama, make_text

        from compressor import api

        self.root.mkdir(parents=True, exist_ok=True)
        make_llama(self.model, layers=2, hidden=32, intermediate=64)
        self.calib.write_text(make_text(3000, seed=7))
        synthetic_wiki(20)
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(
            self.gpt2)
        for path, value in ((self.nan, float("nan")), (self.inf, float("inf"))):
            shutil.copytree(self.model, path)
            weights = load_file(path / "model.safetensors")
            weights["model.layers.1.mlp.up_proj.weight"][3, 5] = value
            save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        make_llama(self.big_tok, layers=2, hidden=32, intermediate=64, vocab=128)  # a model of 128 tokens...
        for f in self.model.iterdir():  # ...with the 256-token tokenizer of another
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, self.big_tok / f.name)
        self.empty_dir.mkdir()
        self.empty_file.write_bytes(b"")
        self.text.write_text("not a model\n")
        api.quantize(str(self.model), "rtn", self.artifact, {"bits": 4, "group_size": 16})
        api.pack(self.model, self.packed)
        good = "name: ok\nstages:\n  - quantize: {method: rtn, options: {group_size: 16}}\n"
        self.recipe.write_text(good)
        self.recipe_unknown.write_text(good.replace("method: rtn", "method: rtn, colour: blue"))
        self.recipe_bad_value.write_text(good.replace("group_size: 16", "bits: 99"))
        self._build_scale_and_mixed()
        (self.root / "ready").write_text("")

    def _build_scale_and_mixed(self) -> None:
        from conftest import make_llama
        from transformers import AutoModelForCausalLM

        from compressor import api

        AutoModelForCausalLM.from_pretrained(self.model).save_pretrained(self.sharded, max_shard_size="20KB")
        for f in self.model.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, self.sharded / f.name)
        index = json.loads((self.sharded / "model.safetensors.index.json").read_text())["weight_map"]
        shard = index["model.layers.1.mlp.down_proj.weight"]  # a shard of the last block's, named in the index
        assert len(set(index.values())) > 2, index
        for path in (self.missing_shard, self.truncated_shard):
            shutil.copytree(self.sharded, path)
        (self.missing_shard / shard).unlink()
        cut = self.truncated_shard / shard
        cut.write_bytes(cut.read_bytes()[:-64])  # its last tensor's bytes cut short
        probe = {"probe_samples": 2, "probe_len": 16}
        api.sensitivity(str(self.model), "rtn", self.sens, probe, calib=str(self.calib), samples=4, seq_len=32)
        other = make_llama(self.root / "other-model", layers=1, hidden=32, intermediate=64, seed=3)
        api.sensitivity(str(other), "rtn", self.sens_other, probe, calib=str(self.calib), samples=4, seq_len=32)
        shutil.copytree(self.sens, self.sens_damaged)
        table = self.sens_damaged / "sensitivity.json"
        table.write_text(table.read_text()[: table.stat().st_size // 2])

    def snapshot(self) -> dict[str, str]:
        return {str(f.relative_to(self.root)): hashlib.sha256(f.read_bytes()).hexdigest()
                for f in sorted(self.root.rglob("*")) if f.is_file() and "cache" not in f.parts}


@dataclass(frozen=True)
class Cell:
    command: str
    bad: str  # missing, empty, wrong-type, dir-vs-file, wrong-architecture, wrong-dtype, nan-weights, ...
    args: Callable[[Workspace], list]

    @property
    def id(self) -> str:
        return f"{self.command}:{self.bad}"


def _q(model_attr: str, *extra) -> Callable[[Workspace], list]:
    return lambda ws: ["quantize", getattr(ws, model_attr), "-o", ws.out, "--group-size", "16", "--calib", ws.calib,
                       *CAL, *extra]


def _p(model_attr: str, *extra) -> Callable[[Workspace], list]:
    return lambda ws: ["prune", getattr(ws, model_attr), "-o", ws.out, "--calib", ws.calib, *CAL, *extra]


def _e(model_attr: str, *extra) -> Callable[[Workspace], list]:
    return lambda ws: ["eval", getattr(ws, model_attr), "--data", ws.calib, "--windows", "2", "--window-len", "32",
                       *extra]


def _r(candidate: str, *extra, base: str = "model") -> Callable[[Workspace], list]:
    return lambda ws: ["report", getattr(ws, candidate), "--base", getattr(ws, base), "-o", ws.out, *EVAL, *extra]


def _run(recipe: str, model: str = "model", *extra) -> Callable[[Workspace], list]:
    return lambda ws: ["run", getattr(ws, recipe), getattr(ws, model), "-o", ws.out, "--calib", ws.calib, *extra]


def _d(*extra, teacher: str = "model", student: str = "model", data: str = "calib") -> Callable[[Workspace], list]:
    return lambda ws: ["distill", "--teacher", getattr(ws, teacher), "--student", getattr(ws, student), "--data",
                       getattr(ws, data), "--eval-data", ws.calib, "-o", ws.out, "--seq-len", "32", "--batch-size", "4",
                       "--eval-windows", "4", "--tokens", "512", *extra]


def _mixed(*extra, sens: str | None = None) -> Callable[[Workspace], list]:
    return lambda ws: ["quantize", ws.model, "-o", ws.out, "-m", "rtn", "--mixed", "--calib", ws.calib, *CAL,
                       "--probe-samples", "2", "--probe-len", "16", "--verify-windows", "2",
                       *(["--sensitivity", getattr(ws, sens)] if sens else []), *extra]


def _s(model_attr: str, *extra) -> Callable[[Workspace], list]:
    return lambda ws: ["sensitivity", getattr(ws, model_attr), "-m", "rtn", "-o", ws.out, "--calib", ws.calib, *CAL,
                       "--probe-samples", "2", "--probe-len", "16", *extra]


def _minitron(model_attr: str, *extra) -> Callable[[Workspace], list]:
    return _p(model_attr, "-m", "minitron", *extra)


BAD_MODELS = {"missing": "missing", "empty": "empty_dir", "wrong-type": "text", "dir-vs-file": "empty_file",
              "wrong-architecture": "gpt2"}

CELLS: list[Cell] = [
    # quantize and prune: every model input, then settings
    *[Cell("quantize", bad, _q(attr)) for bad, attr in BAD_MODELS.items()],
    Cell("quantize", "wrong-dtype", _q("model", "--dtype", "int8")),
    Cell("quantize", "wrong-dtype", _q("model", "--hessian-dtype", "float16")),
    Cell("quantize", "nan-weights", _q("nan")),
    Cell("quantize", "inf-weights", _q("inf")),
    Cell("quantize", "mismatched-tokenizer", _q("big_tok")),
    Cell("quantize", "out-of-range", _q("model", "--bits", "9")),
    Cell("quantize", "out-of-range", _q("model", "--samples", "0")),
    Cell("quantize", "out-of-range", lambda ws: ["quantize", ws.model, "-o", ws.out, "--group-size", "-7"]),
    Cell("quantize", "contradictory", _q("model", "--resume", "--restart")),
    Cell("quantize", "contradictory", _q("model", "-m", "gptq,rtn")),
    Cell("quantize", "data-missing", lambda ws: ["quantize", ws.model, "-o", ws.out, "-m", "gptq",
                                                 "--group-size", "16", "--calib", ws.missing]),
    Cell("quantize", "data-dir-vs-file", lambda ws: ["quantize", ws.model, "-o", ws.out, "-m", "gptq",
                                                     "--group-size", "16", "--calib", ws.empty_dir]),
    Cell("quantize", "data-empty", lambda ws: ["quantize", ws.model, "-o", ws.out, "-m", "gptq", "--group-size", "16",
                                               "--calib", ws.empty_file, *CAL]),
    Cell("quantize", "output-is-file", lambda ws: ["quantize", ws.model, "-o", ws.text, "--group-size", "16"]),
    *[Cell("prune", bad, _p(attr)) for bad, attr in BAD_MODELS.items()],
    Cell("prune", "wrong-dtype", _p("model", "--dtype", "int8")),
    Cell("prune", "nan-weights", _p("nan")),
    Cell("prune", "inf-weights", _p("inf")),
    Cell("prune", "mismatched-tokenizer", _p("big_tok")),
    Cell("prune", "out-of-range", _p("model", "--sparsity", "1.5")),
    Cell("prune", "contradictory", _p("model", "--resume", "--restart")),
    Cell("prune", "contradictory", _p("model", "-m", "rtn")),
    Cell("prune", "output-is-file", lambda ws: ["prune", ws.model, "-o", ws.text]),
    # pack / unpack
    *[Cell("pack", bad, (lambda a: lambda ws: ["pack", getattr(ws, a), "-o", ws.out])(attr))
      for bad, attr in BAD_MODELS.items() if bad != "wrong-architecture"],
    Cell("pack", "wrong-dtype", lambda ws: ["pack", ws.model, "-o", ws.out, "--dtype", "int8"]),
    Cell("pack", "out-of-range", lambda ws: ["pack", ws.model, "-o", ws.out, "--table-log", "40"]),
    Cell("pack", "contradictory", lambda ws: ["pack", ws.packed, "-o", ws.out]),
    Cell("pack", "output-is-file", lambda ws: ["pack", ws.model, "-o", ws.text]),
    *[Cell("unpack", bad, (lambda a: lambda ws: ["unpack", getattr(ws, a), "-o", ws.out])(attr))
      for bad, attr in BAD_MODELS.items()],
    Cell("unpack", "wrong-type", lambda ws: ["unpack", ws.artifact, "-o", ws.out]),
    Cell("unpack", "output-is-file", lambda ws: ["unpack", ws.packed, "-o", ws.text]),
    # eval
    *[Cell("eval", bad, _e(attr)) for bad, attr in BAD_MODELS.items()],
    Cell("eval", "nan-weights", _e("nan")),
    Cell("eval", "mismatched-tokenizer", _e("big_tok")),
    Cell("eval", "out-of-range", _e("model", "--windows", "0")),
    Cell("eval", "out-of-range", _e("model", "--batch-size", "0")),
    Cell("eval", "contradictory", _e("model", "--limit", "5")),
    Cell("eval", "data-missing", lambda ws: ["eval", ws.model, "--data", ws.missing]),
    Cell("eval", "data-dir-vs-file", lambda ws: ["eval", ws.model, "--data", ws.empty_dir]),
    Cell("eval", "data-empty", lambda ws: ["eval", ws.model, "--data", ws.empty_file]),
    Cell("eval", "output-is-dir", lambda ws: ["eval", ws.model, "--data", ws.calib, "--windows", "2",
                                              "--window-len", "32", "--report", ws.empty_dir]),
    # report
    *[Cell("report", bad, _r(attr)) for bad, attr in BAD_MODELS.items()],
    *[Cell("report", f"base-{bad}", _r("artifact", base=attr)) for bad, attr in BAD_MODELS.items()],
    Cell("report", "nan-weights", _r("artifact", base="nan")),
    Cell("report", "out-of-range", _r("artifact", "--windows", "0")),
    Cell("report", "contradictory", _r("artifact", base="gpt2")),
    Cell("report", "output-is-file", lambda ws: ["report", ws.artifact, "--base", ws.model, "-o", ws.text, *EVAL]),
    # run RECIPE
    Cell("run", "missing", _run("missing")),
    Cell("run", "empty", _run("empty_file")),
    Cell("run", "wrong-type", _run("text")),
    Cell("run", "dir-vs-file", _run("empty_dir")),
    Cell("run", "unknown-recipe-key", _run("recipe_unknown")),
    Cell("run", "out-of-range", _run("recipe_bad_value")),
    *[Cell("run", f"model-{bad}", _run("recipe", attr)) for bad, attr in BAD_MODELS.items()],
    Cell("run", "nan-weights", _run("recipe", "nan")),
    Cell("run", "mismatched-tokenizer", _run("recipe", "big_tok")),
    Cell("run", "contradictory", _run("recipe", "model", "--resume", "--restart")),
    Cell("run", "output-is-file", lambda ws: ["run", ws.recipe, ws.model, "-o", ws.text]),
    # prune --method minitron: targets
    Cell("prune", "out-of-range", _minitron("model", "--target-params", "10M")),
    Cell("prune", "out-of-range", _minitron("model", "--hidden", "128")),
    Cell("prune", "out-of-range", _minitron("model", "--target-params", "1k", "--axis", "depth")),
    Cell("prune", "wrong-type", _minitron("model", "--target-params", "100x")),
    Cell("prune", "contradictory", _minitron("model", "--heads", "3")),
    Cell("prune", "contradictory", _minitron("model")),  # no target
    Cell("prune", "nan-weights", _minitron("nan", "--ffn", "48")),
    Cell("prune", "mismatched-tokenizer", _minitron("big_tok", "--ffn", "48")),
    # distill: teacher, student, data and settings
    *[Cell("distill", f"student-{bad}", _d(student=attr)) for bad, attr in BAD_MODELS.items()],
    *[Cell("distill", f"teacher-{bad}", _d(teacher=attr)) for bad, attr in BAD_MODELS.items()],
    Cell("distill", "nan-weights", _d(student="nan")),
    Cell("distill", "inf-weights", _d(teacher="inf")),
    Cell("distill", "mismatched-tokenizer", _d(student="big_tok")),
    Cell("distill", "wrong-type", _d(student="artifact")),  # a quantized student
    Cell("distill", "wrong-type", _d("--tokens", "lots")),
    Cell("distill", "out-of-range", _d("--temperature", "0")),
    Cell("distill", "out-of-range", _d("--tokens", "10")),
    Cell("distill", "out-of-range", _d("--lr", "-1")),
    Cell("distill", "contradictory", _d("--resume", "--restart")),
    Cell("distill", "contradictory", _d("--resume")),  # nothing to resume
    Cell("distill", "data-missing", _d(data="missing")),
    Cell("distill", "data-empty", _d(data="empty_file")),
    Cell("distill", "data-dir-vs-file", _d(data="empty_dir")),
    Cell("distill", "output-is-file", lambda ws: [*_d()(ws), "-o", ws.text]),  # the last -o counts
    # mixed precision: quantize --mixed and sensitivity
    Cell("quantize", "contradictory", _mixed("--target-bits", "3.5", "--max-kl", "0.1")),
    Cell("quantize", "contradictory", _mixed("--target-bits", "3.5", "--bits", "4")),
    Cell("quantize", "contradictory", lambda ws: ["quantize", ws.model, "-o", ws.out, "--target-bits", "3.5"]),
    Cell("quantize", "contradictory", _mixed()),  # no budget
    Cell("quantize", "contradictory", lambda ws: [*_mixed("--target-bits", "3")(ws), "-m", "hqq"]),
    Cell("quantize", "out-of-range", _mixed("--target-bits", "1")),
    Cell("quantize", "out-of-range", _mixed("--max-kl", "-1")),
    Cell("quantize", "sensitivity-wrong-type", _mixed("--target-bits", "3.5", sens="text")),
    Cell("quantize", "sensitivity-damaged", _mixed("--target-bits", "3.5", sens="sens_damaged")),
    Cell("quantize", "sensitivity-foreign-dir", _mixed("--target-bits", "3.5", sens="artifact")),
    Cell("quantize", "sensitivity-other-model", _mixed("--target-bits", "3.5", sens="sens_other")),
    *[Cell("sensitivity", bad, _s(attr)) for bad, attr in BAD_MODELS.items()],
    Cell("sensitivity", "nan-weights", _s("nan")),
    Cell("sensitivity", "mismatched-tokenizer", _s("big_tok")),
    Cell("sensitivity", "contradictory", _s("model", "--target-bits", "3")),
    Cell("sensitivity", "out-of-range", _s("model", "--probe-samples", "0")),
    Cell("sensitivity", "out-of-range", _s("model", "--candidate-bits", "9")),
    Cell("sensitivity", "output-is-file", lambda ws: ["sensitivity", ws.model, "-o", ws.text]),
    # the scale work: lazily read checkpoints with a shard missing or cut short
    Cell("quantize", "missing-shard", _q("missing_shard")),
    Cell("quantize", "truncated-shard", _q("truncated_shard")),
    Cell("quantize", "truncated-shard", _q("truncated_shard", "-m", "gptq")),
    # inspect / verify / bench
    *[Cell("inspect", bad, (lambda a: lambda ws: ["inspect", getattr(ws, a)])(attr))
      for bad, attr in BAD_MODELS.items() if bad != "wrong-architecture"],  # inspect describes any architecture
    *[Cell("verify", bad, (lambda a: lambda ws: ["verify", getattr(ws, a)])(attr))
      for bad, attr in BAD_MODELS.items()],
    Cell("verify", "not-an-artifact", lambda ws: ["verify", ws.model]),
    *[Cell("bench", bad, (lambda a: lambda ws: ["bench", getattr(ws, a), "--device", "cpu"])(attr))
      for bad, attr in BAD_MODELS.items()],
    Cell("bench", "out-of-range", lambda ws: ["bench", ws.artifact, "--device", "cpu", "--batch", "0"]),
    Cell("bench", "wrong-type", lambda ws: ["bench", ws.artifact, "--device", "banana"]),
]


def run_cell(ws: Workspace, cell: Cell) -> str | None:
    """None if the cell behaves (exit 2, one error line, nothing changed), else what went wrong."""
    from typer.testing import CliRunner

    from compressor.cli import app

    before = ws.snapshot()
    result = CliRunner().invoke(app, ["-q", *map(str, cell.args(ws))])
    after = ws.snapshot()
    problems = []
    if result.exit_code != 2:
        problems.append(f"exit code {result.exit_code} ({type(result.exception).__name__ if result.exception else ''}"
                        f" {str(result.exception)[:200] if result.exception else ''})")
    lines = [ln for ln in ANSI.sub("", result.stderr).splitlines() if ln.strip()]
    if len(lines) != 1 or not lines[0].startswith("error: ") or "Traceback" in result.stderr:
        problems.append(f"stderr is not one error line: {result.stderr[-400:]!r}")
    elif ";" not in lines[0]:
        problems.append(f"the error names no fix: {lines[0]!r}")
    if after != before:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        problems.append(f"files changed: {changed[:5]}")
    if ws.out.exists() or ws.out.parent.exists() and any(ws.out.parent.iterdir()):
        problems.append("something was written under the output's directory")
        shutil.rmtree(ws.out.parent, ignore_errors=True)
    return "; ".join(problems) or None
