"""`valle train` on the tiny preset, CPU: metrics, checkpoints, resume after kill -9 equals an uninterrupted
run, SIGTERM saves and stops, stdin commands, non-finite losses, a failing save leaves the last one intact."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from valle_cli.config import load_config
from valle_cli.train.checkpoint import CheckpointError, latest, list_checkpoints, load_checkpoint
from valle_cli.train.trainer import Trainer, TrainingError

from .conftest import cpu_seconds, default_sigint, needs_espeak

pytestmark = needs_espeak


def config(dataset: Path, *extra: str):
    return load_config(
        "tiny",
        [
            f"data.paths=[{dataset}]",
            "data.batch_size=2",
            "data.val_fraction=0.2",
            "train.warmup_steps=2",
            "train.eval_every=1000",
            *extra,
        ],
    )


def sets(*overrides: str) -> list[str]:
    """["a=1", "b=2"] -> ["--set", "a=1", "--set", "b=2"]"""
    return [x for o in overrides for x in ("--set", o)]


def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "valle_cli.cli.app", "train", *args],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def test_trains_logs_and_keeps_the_last_checkpoints(dataset, tmp_path):
    cfg = config(dataset, "train.steps=6", "train.save_every=2", "train.keep_last=2", "train.eval_every=3")
    events = []
    info = Trainer(cfg, tmp_path / "run", lambda k, p: events.append((k, p))).train()
    assert info.step == 6
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004", "step-00000006"]
    assert latest(run).name == "step-00000006"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 7))
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in train_rows)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert len(evals) == 2 and all(f"acc.l{q}" in evals[0] for q in range(8))
    assert (run / "config.yaml").is_file()
    meta = load_checkpoint(latest(run))["meta"]
    assert meta["config"]["model"]["d_model"] == 64 and meta["symbols"]["version"] == 1
    assert meta["codec"]["name"] == "mel"


def test_precision_means_autocast_where_the_hardware_computes_it(monkeypatch):
    from valle_cli.train import trainer

    cpu = torch.device("cpu")
    assert trainer.autocast_dtype("fp32", cpu) == (None, None)
    monkeypatch.setattr(trainer, "cpu_has_bf16", lambda: True)
    assert trainer.autocast_dtype("bf16", cpu) == (torch.bfloat16, None)
    assert trainer.autocast_dtype("auto", cpu) == (torch.bfloat16, None)
    dtype, note = trainer.autocast_dtype("fp16", cpu)
    assert dtype is None and "needs a GPU" in note
    monkeypatch.setattr(trainer, "cpu_has_bf16", lambda: False)
    dtype, note = trainer.autocast_dtype("bf16", cpu)
    assert dtype is None and "no bf16 instructions" in note and "fp32" in note
    assert trainer.autocast_dtype("auto", cpu) == (None, None)


def test_bf16_training_on_the_cpu_runs_under_autocast(dataset, tmp_path, monkeypatch):
    """On this CPU if it has bf16 instructions (else the fp32 fallback says so): the loss is finite, the
    weights stay fp32, the checkpoint resumes."""
    from valle_cli.train import trainer

    cfg = config(dataset, "train.steps=3", "train.precision=bf16", "train.save_every=3")
    seen, events = [], []
    real = torch.autocast

    def watching(device_type, dtype=None, **kw):
        seen.append((device_type, dtype))
        return real(device_type, dtype=dtype, **kw)

    monkeypatch.setattr(torch, "autocast", watching)
    t = Trainer(cfg, tmp_path / "run", lambda k, p: events.append((k, p)))
    t.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if r["kind"] == "train")
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    notes = [p.get("message", "") for k, p in events if k == "info"]
    if trainer.cpu_has_bf16():
        assert ("cpu", torch.bfloat16) in seen and not any("bf16 instructions" in n for n in notes)
    else:
        assert not seen and any("no bf16 instructions" in n for n in notes)


def test_ar_only_steps_train_level_zero_first(dataset, tmp_path):
    """The curriculum: every sample trains the AR until train.ar_only_steps, then levels follow the weights."""
    cfg = config(dataset, "train.steps=8", "train.ar_only_steps=4", "data.batch_size=4")
    events = []
    Trainer(cfg, tmp_path / "run", lambda k, p: events.append((k, p))).train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    levels = {r["step"]: {k for k in r if k.startswith("loss.l")} for r in rows if r["kind"] == "train"}
    assert all(levels[s] == {"loss.l0"} for s in range(1, 5)), levels
    # 16 samples drawn uniformly from 8 levels: all of them level 0 has odds of 8**-16
    assert set().union(*(levels[s] for s in range(5, 9))) - {"loss.l0"}, levels
    assert any("level 0 (AR) only until step 4" in p.get("message", "") for k, p in events if k == "info")


def test_resume_after_kill_matches_an_uninterrupted_run(dataset, tmp_path):
    """kill -9 once the first checkpoint exists (the run may get further before the signal lands on a loaded
    machine: whatever checkpoint is latest is resumed), then resume: the same weights as a run never
    interrupted, and every step logged once."""
    steps = 40
    straight = tmp_path / "straight"
    Trainer(config(dataset, f"train.steps={steps}", "train.save_every=10"), straight).train()
    killed = tmp_path / "killed"
    args = [
        "tiny",
        "--out-dir",
        str(killed),
        *sets(
            f"data.paths=[{dataset}]",
            "data.batch_size=2",
            "data.val_fraction=0.2",
            "train.warmup_steps=2",
            "train.eval_every=1000",
            f"train.steps={steps}",
            "train.save_every=10",
        ),
    ]
    proc = cli(*args, stdin=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "step-00000010").is_dir():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = latest(killed)
    assert last is not None and last.name != f"step-{steps:08d}", "the run finished before the kill landed"
    done = int(last.name.split("-")[1])
    with open(killed / "metrics.jsonl", "a") as f:  # steps the kill lost, and a line it tore
        f.write(json.dumps({"kind": "train", "step": done + 5, "loss": 1.0}) + "\n" + '{"kind": "tra')
    resumed = Trainer(config(dataset, f"train.steps={steps}", "train.save_every=10"), killed)
    info = resumed.train()
    assert info.resumed_from.name == last.name and info.step == steps
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, steps + 1))  # each step once
    a = load_checkpoint(straight / f"step-{steps:08d}")["model"]
    b = load_checkpoint(killed / f"step-{steps:08d}")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_ctrl_c_while_training_is_being_set_up(dataset, tmp_path):
    """Before the loop installs its own handlers (torch importing, the model being built): one line, exit 130,
    no traceback and no half-made checkpoint."""
    run = tmp_path / "run"
    proc = cli("tiny", "--out-dir", str(run), *sets(f"data.paths=[{dataset}]", "train.steps=100000"),
               stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=default_sigint)  # fmt: skip
    try:
        deadline = time.time() + 600
        while (
            cpu_seconds(proc.pid) < 1.0
        ):  # past the interpreter's start-up, into the verb, whatever the load
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "interrupted (SIGINT)" in err and "Traceback" not in err, err
    assert "is saved" not in err and not (run / "metrics.jsonl").exists(), err  # stopped before the loop
    assert not run.exists() or not [p for p in run.iterdir() if p.name.startswith(".")]  # no staging left


def test_sigterm_saves_and_stops(dataset, tmp_path):
    run = tmp_path / "run"
    proc = cli(
        "tiny",
        "--out-dir",
        str(run),
        *sets(f"data.paths=[{dataset}]", "train.steps=100000", "data.batch_size=2"),
        stdin=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") > 12):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # saved, and the status of a program stopped by SIGTERM
    assert "saving and stopping" in err and "interrupted (SIGTERM)" in err
    assert re.search(r"[\d.]+ s/step here: the \d+ steps left take (about )?", err), (
        err
    )  # said after 10 steps
    ck = latest(run)
    assert ck is not None and int(ck.name.split("-")[1]) > 0


def test_the_expected_time_line():
    from valle_cli.cli.train import expected_time

    line = expected_time((100.0, 1), (112.0, 11), 20_011)  # 1.2 s a step, 20,000 steps left
    assert line.startswith("1.20 s/step here: the 20000 steps left take about 6 h 40 min (until ")
    assert "smaller preset" not in line
    days = expected_time((0.0, 1), (100.0, 11), 20_011)  # 10 s a step: 2.3 days
    assert (
        "about 2.3 days" in days
        and "lower train.steps, pick a smaller preset (tiny), or train on a GPU" in days
    )
    assert "under a minute" in expected_time((0.0, 1), (1.0, 11), 20)


def test_stdin_commands(dataset, tmp_path):
    run = tmp_path / "run"
    proc = cli(
        "tiny",
        "--out-dir",
        str(run),
        *sets(
            f"data.paths=[{dataset}]",
            "train.steps=100000",
            "data.batch_size=2",
            "train.warmup_steps=0",
            "train.schedule=constant",
        ),
        stdin=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.05)
    proc.stdin.write("lr 0.0042\nbogus\nlr abc\nsave\n")
    proc.stdin.flush()
    while time.time() < deadline and not list_checkpoints(run):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.stdin.write("quit\n")
    proc.stdin.flush()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "unknown command 'bogus'" in err and "is not a number" in err
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r["kind"] == "train"]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(0.0042)
    assert rows[-1]["step"] < 100000


def test_nonfinite_losses_skip_then_abort(dataset, tmp_path):
    cfg = config(dataset, "train.steps=50")
    warnings = []
    trainer = Trainer(cfg, tmp_path / "run", lambda k, p: warnings.append(p) if k == "warn" else None)
    with torch.no_grad():
        for head in trainer.model.heads:
            head.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="non-finite losses in a row"):
        trainer.train()
    assert len(warnings) == 8 and "step skipped" in warnings[0]["message"]


def test_failed_save_keeps_the_previous_checkpoint(dataset, tmp_path, monkeypatch):
    cfg = config(dataset, "train.steps=2", "train.save_every=1")
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train()
    before = latest(tmp_path / "run")

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)  # stands in for the disk filling up mid-save
    trainer.step += 1
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        trainer.save()
    assert latest(tmp_path / "run") == before
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]
    load_checkpoint(before)


def test_truncated_checkpoint_is_named(dataset, tmp_path):
    cfg = config(dataset, "train.steps=1")
    Trainer(cfg, tmp_path / "run").train()
    ck = latest(tmp_path / "run")
    (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="may be truncated"):
        Trainer(cfg, tmp_path / "run").train()
    (ck / "rng-0.pt").unlink()
    with pytest.raises(CheckpointError, match="lacks rng-0.pt"):
        load_checkpoint(ck)


def test_eval_only_and_config_errors(dataset, tmp_path):
    Trainer(config(dataset, "train.steps=2"), tmp_path / "run").train()
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "valle_cli.cli.app",
            "train",
            "tiny",
            "--out-dir",
            str(tmp_path / "run"),
            *sets(f"data.paths=[{dataset}]", "data.val_fraction=0.3"),
            "--eval",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert "eval at step 2" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "valle_cli.cli.app", "train", "tiny"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 1 and "data.paths is empty" in proc.stderr


def test_lora_trains_only_adapters_and_leaves_the_base_untouched(dataset, tmp_path):
    from safetensors.torch import load_file

    from valle_cli.model.lora import merge_lora

    base_run = tmp_path / "base"
    Trainer(config(dataset, "train.steps=3"), base_run).train()
    base = load_file(str(latest(base_run) / "model.safetensors"))
    cfg = config(
        dataset,
        "train.steps=4",
        f"train.init_from={base_run}",
        "train.lora.rank=4",
        "train.lora.alpha=8",
        "train.lr=1e-2",
    )
    said = []
    trainer = Trainer(cfg, tmp_path / "lora", lambda k, p: said.append(p.get("message", "")))
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    n = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert any(f"weights from {base_run}; LoRA rank 4 (alpha 8)" in m and f"{n:,} of " in m for m in said), (
        said
    )
    trainer.train()
    ck = load_checkpoint(latest(tmp_path / "lora"))
    assert ck["model"] and all("lora_" in k for k in ck["model"])  # adapters only
    assert ck["meta"]["lora"]["rank"] == 4 and ck["meta"]["lora"]["base"] == str(base_run)
    state = trainer.model.state_dict()
    for k, v in base.items():  # the base weights, wherever they sit now, are bit-identical
        key = k if k in state else k.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(state[key], v), k
    assert any(ck["model"][k].abs().sum() > 0 for k in ck["model"] if "lora_B" in k)  # the adapters learned
    # merging folds the adapters in: same outputs, plain linear layers again
    from valle_cli.model.valle import Sample

    b = trainer.ds
    s = Sample(
        torch.tensor([1, 5, 6, 2]),
        torch.from_numpy(b.codes(0)[:, :20].astype("int64")),
        torch.from_numpy(b.codes(1)[:, :30].astype("int64")),
        level=2,
    )
    trainer.model.eval()
    before = trainer.model([s], return_hidden=True).hidden
    assert merge_lora(trainer.model) == len(trainer.lora)
    torch.testing.assert_close(trainer.model([s], return_hidden=True).hidden, before, atol=1e-5, rtol=1e-4)
    # resuming the LoRA run restores the adapters
    again = Trainer(cfg, tmp_path / "lora")
    again.resume()
    assert again.step == 4


def test_lora_needs_a_base_and_a_matching_one(dataset, tmp_path):
    from valle_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="no base model"):
        config(dataset, "train.lora.rank=4")
    Trainer(config(dataset, "train.steps=1"), tmp_path / "base").train()
    with pytest.raises(TrainingError, match="does not fit this model"):
        Trainer(config(dataset, f"train.init_from={tmp_path / 'base'}", "model.n_layers=3"), tmp_path / "x")


def test_ddp_two_gloo_processes(dataset, tmp_path):
    """torchrun with 2 CPU processes: ranks read different shards, only rank 0 writes, weights stay in sync
    (the trainer all-gathers a checksum at the end and fails if the ranks drifted apart)."""
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29531",
            "-m",
            "valle_cli.cli.app",
            "train",
            "tiny",
            "--out-dir",
            str(run),
            *sets(
                f"data.paths=[{dataset}]",
                "data.batch_size=2",
                "train.steps=4",
                "train.save_every=2",
                "train.backend=ddp",
            ),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one writer: no duplicated lines
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004"]
    assert load_checkpoint(latest(run))["trainer"]["step"] == 4


def test_ddp_backend_outside_torchrun_says_how(dataset, tmp_path):
    from valle_cli.errors import ValleError

    with pytest.raises(ValleError, match="not started by torchrun"):
        Trainer(config(dataset, "train.backend=ddp"), tmp_path / "run")


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed not installed")
def test_deepspeed_zero1_two_processes_and_resume(dataset, tmp_path):
    """DeepSpeed ZeRO-1 with 2 gloo processes on CPU; a second invocation resumes from its checkpoint."""
    run = tmp_path / "ds"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}

    def launch(steps: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "2",
                "--master-port",
                "29541",
                "-m",
                "valle_cli.cli.app",
                "train",
                "tiny",
                "--out-dir",
                str(run),
                *sets(
                    f"data.paths=[{dataset}]",
                    "data.batch_size=2",
                    f"train.steps={steps}",
                    "train.save_every=2",
                    "train.backend=deepspeed",
                    "train.zero_stage=1",
                ),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            stdin=subprocess.DEVNULL,
        )

    proc = launch(2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = latest(run)
    assert ck.name == "step-00000002" and (ck / "deepspeed").is_dir()
    assert (ck / "rng-0.pt").is_file() and (ck / "rng-1.pt").is_file()
    proc = launch(4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed not installed")
def test_deepspeed_single_process_matches_its_own_resume(dataset, tmp_path):
    cfg = config(dataset, "train.backend=deepspeed", "train.steps=3", "train.save_every=3")
    info = Trainer(cfg, tmp_path / "run").train()
    assert info.step == 3 and (latest(tmp_path / "run") / "deepspeed").is_dir()
    with pytest.raises(TrainingError, match="written by the deepspeed backend"):
        Trainer(config(dataset, "train.steps=4"), tmp_path / "run").train()


def test_eval_samples_and_gradient_accumulation(dataset, tmp_path):
    cfg = config(
        dataset, "train.steps=2", "train.eval_every=2", "train.eval_samples=1", "train.grad_accumulation=2"
    )
    events = []
    trainer = Trainer(cfg, tmp_path / "run", lambda k, p: events.append((k, p)))
    per_epoch = len(trainer.sampler.epoch_batches())
    trainer.train()
    consumed = trainer.sampler.epoch * per_epoch + trainer.sampler.position
    assert consumed == 4  # 2 optimizer steps x 2 accumulated batches
    wavs = list((tmp_path / "run" / "samples" / "step-00000002").glob("*.wav"))
    assert len(wavs) == 1
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert train_rows[-1]["tokens"] > 0


def test_eval_samples_can_say_other_sentences(dataset, tmp_path):
    """train.eval_texts (`valle train --random-text-prompts`): each held-out voice says one of the sentences,
    and texts.tsv says which."""
    import soundfile as sf

    from valle_cli.errors import ConfigError
    from valle_cli.text.sentences import HARVARD

    with pytest.raises(ConfigError, match="empty sentence"):
        config(dataset, 'train.eval_texts=["Hi.", " "]')
    cfg = config(dataset, "train.steps=1", "train.eval_every=1", "train.eval_samples=3",
                 f'train.eval_texts=["{HARVARD[0]}", "{HARVARD[1]}\\tand more"]')  # fmt: skip
    assert cfg.train.eval_texts[1] == HARVARD[1] + " and more"  # one line each, for texts.tsv
    Trainer(cfg, tmp_path / "run", lambda k, p: None).train()
    folder = tmp_path / "run" / "samples" / "step-00000001"
    rows = [line.split("\t") for line in (folder / "texts.tsv").read_text().splitlines()]
    assert sorted(text for _, text in rows) == sorted(cfg.train.eval_texts)  # each (voice, sentence) once
    for name, _ in rows:
        assert "__text" in name and sf.info(str(folder / name)).duration > 0


def test_deepspeed_config_merges_the_users_json(dataset, tmp_path):
    from valle_cli.train.deepspeed_backend import deepspeed_config

    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}, "gradient_clipping": 0.5})
    )
    merged = deepspeed_config(
        config(dataset, "train.zero_stage=1", f"train.deepspeed_config={user}", "train.grad_accumulation=3")
    )
    assert merged["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert merged["gradient_clipping"] == 0.5 and merged["gradient_accumulation_steps"] == 3
    from valle_cli.errors import ValleError
    from valle_cli.train.deepspeed_backend import check_reduction

    check_reduction(merged, world=1)  # one process: any stage
    for bad in ({"stage": 2}, {"stage": 1, "overlap_comm": True}):  # reduced in the order grads arrive
        with pytest.raises(ValleError, match="differs between ranks"):
            check_reduction({"zero_optimization": bad}, world=2)
    check_reduction({"zero_optimization": {"stage": 1}}, world=2)
    with pytest.raises(ValleError, match="stage 3"):
        check_reduction({"zero_optimization": {"stage": 3}}, world=1)
    user.write_text("{not json")

    with pytest.raises(ValleError, match="cannot read train.deepspeed_config"):
        deepspeed_config(config(dataset, f"train.deepspeed_config={user}"))


def test_export_and_load(dataset, tmp_path):
    from valle_cli.infer.load import ModelLoadError, export_model, load_model
    from valle_cli.model.valle import Sample

    run = tmp_path / "run"
    trainer = Trainer(config(dataset, "train.steps=2"), run)
    trainer.train()
    ds = trainer.ds
    s = Sample(
        torch.tensor([1, 5, 6, 2]),
        torch.from_numpy(ds.codes(0)[:, :20].astype("int64")),
        torch.from_numpy(ds.codes(1)[:, :30].astype("int64")),
        level=3,
    )
    trainer.model.eval()
    want = trainer.model([s], return_hidden=True).hidden
    for name, dtype, tol in (
        ("m.safetensors", "fp32", 1e-6),
        ("m.pt", "fp32", 1e-6),
        ("h.safetensors", "fp16", 2e-2),
    ):
        out = export_model(run, tmp_path / name, dtype)
        loaded = load_model(out)
        assert loaded.meta["dtype"] == dtype and loaded.meta["codec"]["name"] == "mel"
        torch.testing.assert_close(loaded.model([s], return_hidden=True).hidden, want, atol=tol, rtol=tol)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "valle_cli.cli.app",
            "export",
            str(run),
            "-o",
            str(tmp_path / "c.pt"),
            "--dtype",
            "bf16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "bf16" in proc.stderr, proc.stderr
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "m.safetensors").read_bytes()[:500])
    with pytest.raises(ModelLoadError, match="may be truncated"):
        load_model(tmp_path / "bad.safetensors")


def test_export_lora_merged_and_alone(dataset, tmp_path):
    from valle_cli.infer.load import ModelLoadError, export_model, load_model
    from valle_cli.model.valle import Sample

    Trainer(config(dataset, "train.steps=2"), tmp_path / "base").train()
    lora_cfg = config(
        dataset, "train.steps=3", f"train.init_from={tmp_path / 'base'}", "train.lora.rank=4", "train.lr=1e-2"
    )
    trainer = Trainer(lora_cfg, tmp_path / "lora")
    trainer.train()
    ds = trainer.ds
    s = Sample(
        torch.tensor([1, 5, 6, 2]),
        torch.from_numpy(ds.codes(0)[:, :20].astype("int64")),
        torch.from_numpy(ds.codes(1)[:, :30].astype("int64")),
        level=0,
    )
    trainer.model.eval()
    want = trainer.model([s], return_hidden=True).hidden
    merged = load_model(export_model(tmp_path / "lora", tmp_path / "merged.safetensors"))
    assert merged.meta["lora"] is None
    torch.testing.assert_close(merged.model([s], return_hidden=True).hidden, want, atol=1e-5, rtol=1e-4)
    alone = export_model(tmp_path / "lora", tmp_path / "adapters.safetensors", lora_only=True)
    beside = load_model(alone)  # adapters loaded beside their base, then merged
    torch.testing.assert_close(beside.model([s], return_hidden=True).hidden, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ModelLoadError, match="not a LoRA run"):
        export_model(tmp_path / "base", tmp_path / "x.safetensors", lora_only=True)


def test_progress_line_shows_an_eta_when_steps_are_slow():
    """Rich estimates speed over the last 30 s by default, so with steps over 30 s the ETA was -:--:--."""
    import io

    from rich.console import Console

    from valle_cli.cli.train import progress_bar

    now = [1000.0]
    out = io.StringIO()
    bar = progress_bar(Console(file=out, width=120, force_terminal=False), get_time=lambda: now[0])
    task = bar.add_task("train", total=100, stats="")
    for step in range(1, 4):
        now[0] += 45.0  # one step every 45 s
        bar.update(task, completed=step, stats="")
    text = "".join(str(c) for c in bar.columns[-1].render(bar.tasks[0]).plain)
    assert text != "-:--:--" and text.count(":") == 2
    h, m, s = (int(x) for x in text.split(":"))
    assert abs(h * 3600 + m * 60 + s - 97 * 45) < 120  # 97 steps left at 45 s


def test_eval_without_held_out_utterances_says_so(dataset, tmp_path):
    """`eval` (stdin or `valle tui`'s e) on a run with data.val_fraction=0 said "eval: done" and scored nothing."""
    from valle_cli.train.commands import Commands

    commands = Commands()
    replies = []
    commands.submit("eval", replies.append)
    events = []
    cfg = config(dataset, "train.steps=2", "data.val_fraction=0")
    Trainer(cfg, tmp_path / "run", lambda k, p: events.append((k, p)), commands).train()
    warned = [p["message"] for k, p in events if k == "warn"]
    assert any("no held-out utterances" in m and "data.val_fraction is 0" in m for m in warned), events
    assert not [k for k, _ in events if k == "eval"]
