"""The sequential engine: statistics on propagated inputs, checkpoints, kill and resume."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from compressor import api
from compressor.calib.data import calibration_set
from compressor.calib.stats import collect_inputs
from compressor.errors import CompressorError

sys.path.insert(0, str(Path(__file__).parent))
import recording_method  # noqa: E402
from helpers import api_in_subprocess, artifact_files  # noqa: E402

recording_method.register()
OPTS = {"bits": 4, "group_size": 32, "sym": False}
CAL = {"samples": 12, "seq_len": 48, "batch_size": 5}


def _quantize(model, out, data, **kw):
    return api.quantize(str(model), recording_method.NAME, out, OPTS, calib=str(data), **CAL, **kw)


def test_statistics_are_those_of_the_already_quantized_prefix(tiny_llama, text_file, tmp_path):
    """With true-sequential collection, each group's statistics equal the statistics of its
    inputs in a forward pass of the finished (quantized) model."""
    recording_method.StatsRTN.seen = []
    out = tmp_path / "q"
    _quantize(tiny_llama, out, text_file)
    seen = recording_method.StatsRTN.seen
    loaded = api.load(out)
    adapter = loaded.adapter
    tokens = calibration_set(str(text_file), loaded.tokenizer, CAL["samples"], CAL["seq_len"])
    groups = {}
    for i, block in enumerate(adapter.blocks(loaded.model)):
        linears = adapter.block_linears(block)
        for g in adapter.groups:
            groups[f"{i}.{g.name}"] = [linears[n] for n in g.linears]
    with collect_inputs(groups, {"hessian", "absmax", "mean"}) as collectors, torch.no_grad():
        loaded.model(tokens.input_ids)
    assert len(seen) == len(groups)
    for record, (name, per_kind) in zip(seen, collectors.items()):
        assert record["group"] == name.split(".", 1)[1]
        for kind, c in per_kind.items():
            torch.testing.assert_close(record[kind], c.result(), rtol=1e-4, atol=1e-5, msg=f"{name} {kind}")


def test_deterministic_artifact_bytes(tiny_llama, text_file, tmp_path):
    _quantize(tiny_llama, tmp_path / "a", text_file)
    _quantize(tiny_llama, tmp_path / "b", text_file)
    assert artifact_files(tmp_path / "a") == artifact_files(tmp_path / "b")


def _failing_at(call: int):
    """StatsRTN.on_group raising at its `call`-th call."""
    original = recording_method.StatsRTN.on_group
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise RuntimeError("injected fault")
        return original(self, *args, **kwargs)

    return flaky


def test_failure_midway_then_resume_is_identical(tiny_llama, text_file, tmp_path, monkeypatch):
    _quantize(tiny_llama, tmp_path / "clean", text_file)
    original = recording_method.StatsRTN.on_group
    out = tmp_path / "resumed"
    monkeypatch.setattr(recording_method.StatsRTN, "on_group", _failing_at(6))  # second group of the second block
    with pytest.raises(RuntimeError, match="injected fault"):
        _quantize(tiny_llama, out, text_file)
    assert not out.exists()
    run_dir = api.run_directory_for(out)
    assert (run_dir / "block-0000.safetensors").exists()
    with pytest.raises(CompressorError, match="--resume"):
        _quantize(tiny_llama, out, text_file)
    monkeypatch.setattr(recording_method.StatsRTN, "on_group", original)
    _quantize(tiny_llama, out, text_file, resume=True)
    assert artifact_files(out) == artifact_files(tmp_path / "clean")
    assert not run_dir.exists()


def test_inputs_checkpointed_now_and_then_resume_from_the_last_saved(tiny_llama, text_file, tmp_path, monkeypatch):
    """Past InputsSchedule.SMALL_BYTES the inputs are saved only now and then: a resume starts at the
    last block whose inputs were saved, computes the later finished blocks again, and gives the same bytes."""
    from compressor.pipeline.checkpoint import InputsSchedule
    from compressor.progress import Progress

    _quantize(tiny_llama, tmp_path / "clean", text_file)
    monkeypatch.setattr(InputsSchedule, "SMALL_BYTES", 0)
    monkeypatch.setattr(InputsSchedule, "RATIO", 1e9)  # only the first block's successor's inputs are saved
    original = recording_method.StatsRTN.on_group
    out = tmp_path / "resumed"
    monkeypatch.setattr(recording_method.StatsRTN, "on_group", _failing_at(10))  # second group of the third block
    with pytest.raises(RuntimeError, match="injected fault"):
        _quantize(tiny_llama, out, text_file)
    run_dir = api.run_directory_for(out)
    assert sorted(p.name for p in run_dir.glob("[bi]*.safetensors")) == [
        "block-0000.safetensors", "block-0001.safetensors", "inputs-0001.safetensors"]
    monkeypatch.setattr(recording_method.StatsRTN, "on_group", original)
    logged = []

    class Recording(Progress):
        def log(self, message):
            logged.append(message)

    _quantize(tiny_llama, out, text_file, resume=True, progress=Recording())
    assert any("resuming after block 1/3" in m for m in logged), logged
    assert any("block 2 computed again (the inputs of block 2 are the last ones saved)" in m for m in logged), logged
    assert artifact_files(out) == artifact_files(tmp_path / "clean")


def test_a_run_starting_again_drops_the_inputs_an_earlier_attempt_left(tmp_path):
    from compressor.pipeline.checkpoint import RunDirectory

    run = RunDirectory(tmp_path / "run", "key", 4)
    run.start()
    for index in (1, 3):
        run.save_inputs(index, torch.ones(2, 3) * index)
    (tmp_path / "run" / "notes.txt").write_text("not ours to delete")
    run.drop_other_inputs(1)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["inputs-0001.safetensors", "notes.txt", "run.json"]
    assert torch.equal(run.load_inputs(1)["hidden"], torch.ones(2, 3))


def test_inputs_schedule_saves_once_the_blocks_outweigh_the_last_save():
    from compressor.pipeline.checkpoint import InputsSchedule

    big = InputsSchedule.SMALL_BYTES + 1
    schedule = InputsSchedule(every_block=False)
    assert schedule.due(big)  # the first save measures what one costs
    schedule.saved(2.0)
    assert not schedule.due(big)
    assert schedule.due(InputsSchedule.SMALL_BYTES)  # small inputs go with every block
    schedule.since -= InputsSchedule.RATIO * 2.0
    assert schedule.due(big)
    assert not schedule.due(big)
    assert InputsSchedule(every_block=True).due(big) and all(InputsSchedule(True).due(big) for _ in range(3))


def _run_script(tiny_llama, text_file, out, resume, kill_after=None):
    return api_in_subprocess("quantize", tiny_llama, recording_method.NAME, out, OPTS, calib=text_file, resume=resume,
                             kill_after=kill_after, setup="import recording_method; recording_method.register()", **CAL)


def test_sigkilled_process_resumes_to_identical_artifact(tiny_llama, text_file, tmp_path):
    clean = tmp_path / "clean"
    _quantize(tiny_llama, clean, text_file)
    out = tmp_path / "killed"
    killed = _run_script(tiny_llama, text_file, out, resume=False, kill_after=1)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    assert api.run_directory_for(out).exists()
    resumed = _run_script(tiny_llama, text_file, out, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    assert artifact_files(out) == artifact_files(clean)


def test_resume_refuses_other_settings(tiny_llama, text_file, tmp_path, monkeypatch):
    out = tmp_path / "q"
    original = recording_method.StatsRTN.on_group

    def fail(self, *a, **k):
        raise RuntimeError("stop")

    monkeypatch.setattr(recording_method.StatsRTN, "on_group", fail)
    with pytest.raises(RuntimeError):
        _quantize(tiny_llama, out, text_file)
    monkeypatch.setattr(recording_method.StatsRTN, "on_group", original)
    with pytest.raises(CompressorError, match="other settings"):
        api.quantize(str(tiny_llama), recording_method.NAME, out, {**OPTS, "bits": 3}, calib=str(text_file),
                     resume=True, **CAL)
    api.quantize(str(tiny_llama), recording_method.NAME, out, {**OPTS, "bits": 3}, calib=str(text_file),
                 restart=True, **CAL)
    assert (out / "manifest.json").exists()


def test_gemma3_through_the_calibrated_pipeline(tiny_gemma3, text_file, tmp_path):
    out = tmp_path / "g"
    _quantize(tiny_gemma3, out, text_file)
    loaded = api.load(out)
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        assert torch.isfinite(loaded.model(ids).logits).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_matches_cpu(tiny_llama, text_file, tmp_path):
    """One block at a time on the GPU: RTN gives the same bytes as on the CPU, and the
    calibrated engine the same codes up to rounding ties from GPU matmul order."""
    api.quantize(str(tiny_llama), "rtn", tmp_path / "rtn-cpu", OPTS)
    api.quantize(str(tiny_llama), "rtn", tmp_path / "rtn-gpu", OPTS, device="cuda")
    assert artifact_files(tmp_path / "rtn-cpu") == artifact_files(tmp_path / "rtn-gpu")
    _quantize(tiny_llama, tmp_path / "cal-cpu", text_file)
    _quantize(tiny_llama, tmp_path / "cal-gpu", text_file, device="cuda")
    cpu, gpu = api.load(tmp_path / "cal-cpu").model, api.load(tmp_path / "cal-gpu").model
    for (name, a), (_, b) in zip(cpu.named_parameters(), gpu.named_parameters()):
        assert (a != b).float().mean() < 0.01, name
