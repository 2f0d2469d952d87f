"""Kill-and-resume campaign: every long command SIGKILLed at random wall-clock points, then resumed.

Each command of `COMMANDS` runs on a tiny random model in a workspace of its own. A run is a real
`compress` process (forked from this one after the imports, so that a kill lands in the work and
not in Python's start-up; nothing in the product is instrumented): it is killed after a random
delay drawn over the length of an uninterrupted run, the state on disk is checked, and the next
run continues it (`--resume` where the command keeps a run directory, else the same command
again), until one finishes. Checked after every kill: the final name holds either the previous
artifact, byte for byte, or the complete new one (never a half-written one and never nothing);
checked at the end: the output is byte-identical to an uninterrupted run's (files that differ
between two uninterrupted runs, such as build timings, aside) and no temporary is left.

The kill delays are drawn over the uninterrupted runs' lengths measured in the same sitting and
under the same parallelism (`workers` processes at once, one command each), so that kills land in
the work whatever the machine's speed. A new command is one entry of `COMMANDS`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread: a forked child never inherits a thread pool
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
CALIB = ["--samples", "8", "--seq-len", "64"]
EVAL = ["--texts", "wiki", "--windows", "2", "--window-len", "64"]


@dataclass
class Command:
    """One command under test: its arguments in a workspace, what it writes and how it resumes."""
    name: str
    stage: str  # the command (quantize, prune, pack, unpack, report, run)
    args: Callable[["Workspace"], list[str]]
    needs: tuple[str, ...] = ()  # other commands whose (uninterrupted) outputs this one reads
    run_directory: bool = True  # keeps per-block checkpoints: continue with --resume
    recipe: bool = False  # a recipe run: continue with --resume while its state file exists
    # the file whose presence means "continue with --resume" (default: the run directory's state)
    state: Callable[[Path], Path] | None = None
    # the output is itself a resumable run directory (a sensitivity pass): after a kill, every file
    # of the finished output that is already there must hold its final bytes
    in_place: bool = False
    scratch: Callable[["Workspace"], list[Path]] = lambda ws: []  # removed before every trial (caches)
    # directories left out of every comparison: caches whose file names follow the output's path
    caches: tuple[str, ...] = ()
    previous: str | None = None  # a command whose artifact is placed at the output first (--overwrite)
    # files left out of the byte comparison: build.json (when and how long) by default; None: those
    # that differ between two uninterrupted runs (measured: reports hold their own timings)
    volatile: tuple[str, ...] | None = ("build.json",)


def _quantize(method: str, *options: str) -> Callable[["Workspace"], list[str]]:
    return lambda ws: ["quantize", str(ws.model), "-m", method, *options, "--calib", str(ws.calib), *CALIB]


def _prune(method: str) -> Callable[["Workspace"], list[str]]:
    return lambda ws: ["prune", str(ws.model), "-m", method, "--sparsity", "0.25", "--calib", str(ws.calib), *CALIB]


PROBE = ["--probe-samples", "4", "--probe-len", "32"]
# distillation: 24 steps of 4 x 32 tokens, a checkpoint every 2 steps
DISTILL = ["--data", "{calib}", "--eval-data", "{calib}", "--seq-len", "32", "--batch-size", "4", "--eval-windows", "4",
           "--tokens", str(24 * 4 * 32), "--save-every", "2"]


def _distill(ws: "Workspace") -> list[str]:
    return ["distill", "--teacher", str(ws.model), "--student", str(ws.reference("minitron")),
            *[a.format(calib=ws.calib) for a in DISTILL]]


def _sensitivity_cache(ws: "Workspace") -> list[Path]:
    return [ws.runs / "mixed.sensitivity"]


COMMANDS: dict[str, Command] = {c.name: c for c in [
    Command("rtn", "quantize", _quantize("rtn", "--group-size", "32")),
    Command("gptq", "quantize", _quantize("gptq", "--group-size", "32"), previous="rtn"),
    Command("awq", "quantize", _quantize("awq", "--group-size", "32"), previous="rtn"),
    Command("awq+gptq", "quantize", _quantize("awq+gptq", "--group-size", "32"), previous="rtn"),
    Command("smoothquant", "quantize", _quantize("smoothquant"), previous="rtn"),
    Command("w8a8", "quantize", _quantize("w8a8"), previous="rtn"),
    Command("fp8", "quantize", _quantize("fp8"), previous="rtn"),
    Command("hqq", "quantize", _quantize("hqq", "--group-size", "32"), previous="rtn"),
    Command("slicegpt", "prune", _prune("slicegpt"), previous="rtn"),
    Command("modegpt", "prune", _prune("modegpt"), previous="rtn"),
    Command("pack", "pack", lambda ws: ["pack", str(ws.model)], run_directory=False, previous="rtn"),
    Command("unpack", "unpack", lambda ws: ["unpack", str(ws.reference("pack"))], needs=("pack",),
            run_directory=False),
    Command("report", "report", lambda ws: ["report", str(ws.reference("rtn")), str(ws.reference("hqq")),
                                            "--base", str(ws.model), *EVAL], needs=("rtn", "hqq"),
            run_directory=False, volatile=None),
    Command("recipe", "run", lambda ws: ["run", str(ws.recipe), str(ws.model), "--calib", str(ws.calib)],
            run_directory=False, recipe=True, volatile=None, caches=(".eval-cache",)),
    # the scale work: a checkpoint in several safetensors shards read lazily, block by block (every
    # quantize row above without a pruner runs the lazy path too, from one file)
    Command("gptq-sharded", "quantize", lambda ws: ["quantize", str(ws.sharded), "-m", "gptq", "--group-size", "32",
                                                    "--calib", str(ws.calib), *CALIB], previous="rtn"),
    Command("minitron", "prune", lambda ws: ["prune", str(ws.model), "-m", "minitron", "--ffn", "96", "--layers", "2",
                                             "--calib", str(ws.calib), *CALIB], previous="rtn"),
    Command("distill", "distill", _distill, needs=("minitron",), previous="rtn", volatile=None,
            state=lambda out: out.with_name(f".{out.name}.distill") / "latest" / "state.json"),
    Command("sensitivity", "sensitivity", lambda ws: ["sensitivity", str(ws.model), "-m", "gptq",
                                                      *PROBE, "--calib", str(ws.calib), *CALIB],
            run_directory=False, in_place=True, volatile=None),
    # a mixed-precision search and build with its own sensitivity pass (the cache removed first)
    Command("mixed", "quantize", lambda ws: ["quantize", str(ws.model), "-m", "gptq", "--mixed", "--target-bits", "3.5",
                                             "--sensitivity", str(_sensitivity_cache(ws)[0]), *PROBE,
                                             "--verify-windows", "4", "--calib", str(ws.calib), *CALIB],
            previous="rtn", volatile=None, scratch=_sensitivity_cache),
]}

RECIPE = """name: chain
stages:
  - prune: {method: slicegpt, options: {sparsity: 0.25}, calib: {samples: 8, seq_len: 64}}
  - quantize: {method: gptq, options: {bits: 4, group_size: 16}, calib: {samples: 8, seq_len: 64}}
  - pack: {}
  - eval: {texts: [wiki], windows: 2, window_len: 64}
  - report: {}
"""


# ---------------------------------------------------------------- the workspace

def synthetic_wiki(articles: int) -> None:
    """A `wiki` asset in the current COMPRESSOR_CACHE: synthetic articles, nothing downloaded."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_text

    from compressor.models import assets

    wiki = assets.text_dir("wiki")
    wiki.mkdir(parents=True, exist_ok=True)
    docs = [{"title": f"article {i}", "text": make_text(150, seed=500 + i)} for i in range(articles)]
    for split in ("calib", "eval"):
        (wiki / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (wiki / "meta.json").write_text(json.dumps({"name": "wiki", "splits": {}}))


def snapshot(path: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative path → sha256 of every file under `path` (files and directories named in `skip` aside)."""
    path = Path(path)
    if not path.exists():
        return {}
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file() and not set(f.relative_to(path).parts) & set(skip)}


def strays(out: Path) -> list[str]:
    """Temporaries beside an output (a finished run leaves none)."""
    parent = out.parent
    return sorted(p.name for p in parent.iterdir() if p.name.startswith((f"{out.name}.tmp-", f"{out.name}.old-",
                                                                        f".{out.name}.run", f".{out.name}.distill")))


class Workspace:
    """A tiny random model, calibration text, a synthetic `wiki` asset, a recipe, and the
    uninterrupted outputs of every command (the references) under one directory."""

    def __init__(self, root: Path, layers: int = 3):
        self.root = Path(root)
        self.model = self.root / "model"
        self.sharded = self.root / "model-sharded"
        self.calib = self.root / "calib.txt"
        self.recipe = self.root / "chain.yaml"
        self.cache = self.root / "cache"
        self.runs = self.root / "runs"  # where trials write
        self.refs = self.root / "ref"  # the uninterrupted outputs (and their records, beside)
        self.references: dict[str, dict[str, str]] = {}
        self.volatile: dict[str, set[str]] = {}
        self.durations: dict[str, float] = {}
        os.environ["COMPRESSOR_CACHE"] = str(self.cache)
        if not self.model.is_dir():
            self._build(layers)

    def _build(self, layers: int) -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_llama, make_text

        self.root.mkdir(parents=True, exist_ok=True)
        make_llama(self.model, layers=layers)
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(self.model).save_pretrained(self.sharded, max_shard_size="40KB")
        for f in self.model.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, self.sharded / f.name)
        self.calib.write_text(make_text(20000, seed=7))
        self.recipe.write_text(RECIPE)
        synthetic_wiki(40)

    def output(self, name: str) -> Path:
        return self.runs / name

    def reference(self, name: str) -> Path:
        return self.refs / name

    def worker(self, index: int) -> None:
        """Trials and references of their own for campaign worker `index` (outputs record paths,
        such as a recipe stage's source, so a worker compares with references made where it runs)."""
        self.runs, self.refs = self.root / f"runs-{index}", self.root / f"ref-{index}"
        self.references, self.volatile, self.durations = {}, {}, {}

    def prepare(self, name: str) -> None:
        """The uninterrupted output of `name` (and of what it needs), run twice: the files that
        differ between the two runs are volatile (timings) and left out of the comparisons."""
        command = COMMANDS[name]
        for need in command.needs + ((command.previous,) if command.previous else ()):
            self.prepare(need)
        if name in self.references:
            return
        known = self.refs / f"{name}.json"  # a workspace used before keeps its uninterrupted runs
        if known.is_file() and self.reference(name).is_dir():
            self.references[name], volatile, self.durations[name] = json.loads(known.read_text())
            self.volatile[name] = set(volatile)
            return
        ref = self.reference(name)
        snaps = []
        for attempt in range(2 if command.volatile is None else 1):
            out = self.output(name)
            _clear(out)
            for path in command.scratch(self):
                _clear(path)
            started = time.perf_counter()
            log = self.runs / "logs" / f"{name}-ref.log"
            status, _ = run_command(self.argv(name, out, overwrite=False), log)
            if status != 0:
                raise RuntimeError(f"{name} failed uninterrupted: see {log}")
            self.durations[name] = min(self.durations.get(name, 1e9), time.perf_counter() - started)
            snaps.append(snapshot(out, command.caches))
            if attempt == 0:
                _clear(ref)
                shutil.copytree(out, ref)
        _clear(self.output(name))
        if command.volatile is None:
            self.volatile[name] = {k for k in set(snaps[0]) | set(snaps[1]) if snaps[0].get(k) != snaps[1].get(k)}
        else:
            self.volatile[name] = {k for k in snaps[0] if Path(k).name in command.volatile}
        self.references[name] = {k: v for k, v in snaps[0].items() if k not in self.volatile[name]}
        known.parent.mkdir(parents=True, exist_ok=True)
        known.write_text(json.dumps([self.references[name], sorted(self.volatile[name]), self.durations[name]]))

    def argv(self, name: str, out: Path, overwrite: bool, resume: bool = False) -> list[str]:
        args = [*COMMANDS[name].args(self), "-o", str(out)]
        return ["-q", *args, *(["--overwrite"] if overwrite else []), *(["--resume"] if resume else [])]


def _clear(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    for stray in strays(path) if path.parent.is_dir() else []:
        shutil.rmtree(path.parent / stray, ignore_errors=True)


# ---------------------------------------------------------------- one process

def run_command(argv: list[str], log: Path, kill_after: float | None = None) -> tuple[int, bool]:
    """Run `compress ARGV` in a forked child (stdout and stderr to `log`); SIGKILL it after
    `kill_after` seconds if it is still running. Returns (exit status, killed)."""
    from compressor import api, cli  # noqa: F401  imported before the fork, so the child starts at the work

    log.parent.mkdir(parents=True, exist_ok=True)
    pid = os.fork()
    if pid == 0:  # the child: the CLI's own entry point, as `compress ARGV` runs it
        code = 70
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.argv = ["compress", *argv]
            try:
                cli.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = None if kill_after is None else time.monotonic() + kill_after
    while True:
        done, status = os.waitpid(pid, 0 if deadline is None else os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            return code, code == -signal.SIGKILL
        time.sleep(0.005)


# ---------------------------------------------------------------- one trial

def resumable(command: Command, out: Path) -> bool:
    """Whether a killed run of `command` left state that the next run continues with --resume."""
    if command.state is not None:
        return command.state(out).is_file()
    if command.recipe:
        return (out / "recipe-run.json").is_file()
    return command.run_directory and (out.parent / f".{out.name}.run" / "run.json").is_file()


@dataclass
class Trial:
    command: str
    kills: int = 0  # runs killed while working
    recovered: bool = False  # finished and byte-identical to the uninterrupted run
    lost: int = 0  # checks that found the previous artifact damaged or a half-written output
    missed: int = 0  # runs that finished before their kill came (the delay outlasted the run)
    problems: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def _start(ws: Workspace, command: Command, out: Path) -> dict[str, str]:
    """A trial's starting state: the previous artifact at the output name (if the command replaces
    one) and no caches; returns the previous artifact's snapshot."""
    _clear(out)
    for path in command.scratch(ws):
        _clear(path)
    if not command.previous:
        return {}
    shutil.copytree(ws.reference(command.previous), out)
    return snapshot(out)


def trial(ws: Workspace, name: str, rng: random.Random, kills: int) -> Trial:
    """Start `name` over a previous artifact, kill it `kills` times at random points, resume until
    it finishes, and check the disk after every kill and at the end."""
    command = COMMANDS[name]
    ws.prepare(name)
    out = ws.output(name)
    previous = _start(ws, command, out)
    reference, volatile = ws.references[name], ws.volatile[name]
    result = Trial(name)
    log = ws.runs / "logs" / f"{name}.log"
    attempts = 0
    started = time.perf_counter()
    while True:
        attempts += 1
        resume = resumable(command, out)
        # --overwrite: a kill may come after the output was written (a pass's own directory is resumed as it is)
        argv = ws.argv(name, out, overwrite=not command.in_place, resume=resume)
        delay = rng.uniform(0.0, ws.durations[name]) if result.kills < kills else None
        ran = time.perf_counter()
        status, killed = run_command(argv, log, kill_after=delay)
        if not killed and status == 0:
            # The delays follow the machine: a run from scratch that finished is the new length (the
            # load of a shared machine changes within a sitting); a resumed one is a lower bound.
            length = time.perf_counter() - ran
            ws.durations[name] = length if not resume else max(ws.durations[name], length)
            result.missed += delay is not None
        if killed:
            result.kills += 1
            if command.in_place:
                now = snapshot(out, command.caches)
                # run.json, the run directory's state, is rewritten (atomically) as blocks finish
                wrong = sorted(k for k in now if k in reference and now[k] != reference[k] and k != "run.json")
                if wrong:
                    result.lost += 1
                    result.problems.append(f"after kill {result.kills}: {wrong[:3]} in {out} hold bytes the "
                                           "finished pass does not")
            elif not command.recipe:
                now = snapshot(out, command.caches)
                if now != previous and {k: v for k, v in now.items() if k not in volatile} != reference:
                    result.lost += 1
                    result.problems.append(f"after kill {result.kills}: {out} is neither the previous nor the new "
                                           "artifact")
            else:
                for stage in sorted({k.split("/")[0] for k in reference if "/" in k}):
                    if not (out / stage).exists():
                        continue
                    rel = stage + "/"
                    want = {k[len(rel):]: v for k, v in reference.items() if k.startswith(rel)}
                    got = {k: v for k, v in snapshot(out / stage, command.caches).items() if rel + k not in volatile}
                    if got != want:
                        result.lost += 1
                        result.problems.append(f"after kill {result.kills}: stage {stage} is half-written")
            continue
        if status != 0:
            result.problems.append(f"run {attempts} exited {status}: see {log}")
            break
        final = {k: v for k, v in snapshot(out, command.caches).items() if k not in volatile}
        left = strays(out)
        result.recovered = final == reference and not left
        if final != reference:
            differ = sorted(k for k in set(final) | set(reference) if final.get(k) != reference.get(k))
            result.problems.append(f"resumed output differs from the uninterrupted one in {differ[:4]}")
        if left:
            result.problems.append(f"temporaries left beside the output: {left}")
        if result.recovered and delay is not None and result.kills < kills and result.missed <= kills:
            _start(ws, command, out)  # the run outran its kill: the trial once more from its start
            continue
        break
    result.wall_s = time.perf_counter() - started
    return result


def _in_children(jobs: list[Callable[[], object]], root: Path) -> list:
    """Run each job in a forked child at once; their (JSON) results in order."""
    pids = []
    for i, job in enumerate(jobs):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                (root / f".child-{i}.json").write_text(json.dumps(job()))
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    results = []
    for i, pid in enumerate(pids):
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"campaign worker {i} failed (exit {os.waitstatus_to_exitcode(status)})")
        results.append(json.loads((root / f".child-{i}.json").read_text()))
    return results


def _trials(ws: Workspace, names: list[str], kills_per_trial: int, trials: int, rng: random.Random,
            budget_s: float | None, each: Callable[[Trial], None] | None, stop_after_kills: int | None) -> dict:
    started = time.perf_counter()
    rows: dict[str, dict] = {n: {"command": n, "stage": COMMANDS[n].stage, "trials": 0, "runs": 0, "recovered": 0,
                                 "lost": 0, "missed": 0, "problems": [], "wall_s": 0.0} for n in names}
    for i in range(trials):
        if budget_s is not None and time.perf_counter() - started > budget_s:
            break
        if stop_after_kills is not None and sum(r["runs"] for r in rows.values()) >= stop_after_kills:
            break
        # every command in turn first, then the one that has had the least time: equal time per
        # command, so quick commands take more kills than slow ones
        name = names[i] if i < len(names) else min(names, key=lambda n: rows[n]["wall_s"])
        t = trial(ws, name, rng, kills_per_trial)
        row = rows[name]
        row["trials"] += 1
        row["runs"] += t.kills
        row["recovered"] += t.kills if t.recovered else 0
        row["lost"] += t.lost
        row["missed"] += t.missed
        row["problems"] += t.problems
        row["wall_s"] += t.wall_s
        if each:
            each(t)
    for name in names:
        rows[name]["delay_scale_s"] = round(ws.durations[name], 2)
    return rows


def campaign(root: Path, names: list[str], kills_per_trial: int, trials: int, seed: int = 0,
             budget_s: float | None = None, each: Callable[[Trial], None] | None = None,
             stop_after_kills: int | None = None, layers: int = 3, workers: int = 1) -> dict:
    """Trials round-robin over `names` (at most `trials`, or until `budget_s` runs out or
    `stop_after_kills` kills are in); per command: kills, trials recovered, lost checks.

    With `workers` > 1 that many processes run trials side by side, each over every command in
    a directory of its own (`runs-I/`), with its share of the kills and of the trials, so that
    every core kills and resumes."""
    ws = Workspace(root, layers)
    started = time.perf_counter()
    workers = max(1, workers)
    share = lambda total: None if total is None else -(-total // workers)  # noqa: E731

    def part(i: int) -> dict:
        if workers > 1:
            ws.worker(i)
        # the uninterrupted references first, timed under the same parallelism as the trials (the
        # other workers make theirs at the same time): the kill delays are drawn over these lengths
        for name in names:
            ws.prepare(name)
        uninterrupted = {n: ws.durations[n] for n in names}
        start = i * len(names) // workers
        order = names[start:] + names[:start]  # the workers start on different commands
        rows = _trials(ws, order, kills_per_trial, share(trials), random.Random(seed * 1000 + i), budget_s, each,
                       share(stop_after_kills))
        for name in names:
            rows[name]["uninterrupted_s"] = uninterrupted[name]
            rows[name]["volatile"] = sorted(ws.volatile[name])
        return rows

    parts = [part(0)] if workers == 1 else _in_children([(lambda i: lambda: part(i))(i) for i in range(workers)],
                                                          ws.root)
    rows = {}
    for name in names:
        row = rows[name] = {**parts[0][name]}
        for other in parts[1:]:
            for key in ("trials", "runs", "recovered", "lost", "missed", "wall_s"):
                row[key] += other[name][key]
            row["problems"] += other[name]["problems"]
            row["delay_scale_s"] = max(row["delay_scale_s"], other[name]["delay_scale_s"])
            row["volatile"] = sorted(set(row["volatile"]) | set(other[name]["volatile"]))
        row["uninterrupted_s"] = round(sum(p[name]["uninterrupted_s"] for p in parts) / len(parts), 2)
    return {"rows": [rows[n] for n in names], "wall_s": time.perf_counter() - started, "workers": workers}
