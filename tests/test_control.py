"""The training control channel: a real tiny training run steered over its Unix socket (status, lr, save,
pause/resume, quit), malformed and unknown requests, a client that leaves mid-message, a second trainer on the
same run, and another user being refused."""

from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest

from valle_cli.config import load_config
from valle_cli.train.checkpoint import list_checkpoints
from valle_cli.train.control import ControlClient, ControlError, ControlServer
from valle_cli.train.trainer import Trainer

from .conftest import needs_espeak

pytestmark = needs_espeak


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


@pytest.fixture
def running(dataset, tmp_path):
    """A tiny training run in a background thread, serving its control socket."""
    cfg = load_config(
        "tiny",
        [f"data.paths=[{dataset}]", "data.batch_size=2", "train.steps=100000", "train.warmup_steps=0",
         "train.schedule=constant", "train.eval_every=100000", "train.save_every=100000"],
    )  # fmt: skip
    run = tmp_path / "run"
    trainer = Trainer(cfg, run, control=True)
    thread = threading.Thread(target=trainer.train, daemon=True)
    thread.start()
    wait_for(lambda: (run / "control.json").is_file() and (run / "metrics.jsonl").is_file())
    yield run, trainer, thread
    trainer.stop_requested = True
    thread.join(timeout=60)


def raw(run):
    """A bare socket to the run, past the hello line."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(json.loads((run / "control.json").read_text())["socket"])
    f = s.makefile("rb")
    assert json.loads(f.readline())["type"] == "hello"
    return s, f


def test_steer_a_run_over_the_socket(running):
    run, trainer, thread = running
    sock_path = json.loads((run / "control.json").read_text())["socket"]
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
    with ControlClient(run) as c:
        assert c.hello["v"] == 1 and "pause" in c.hello["commands"]
        st = c.request("status")
        assert st["ok"] and st["step"] >= 0 and st["steps"] == 100000 and st["paused"] is False
        assert c.request("lr", 0.0042) == {"v": 1, "id": 2, "ok": True, "command": "lr"}
        assert c.request("save")["ok"]
        assert list_checkpoints(run)
        assert c.request("pause")["ok"]
        step = c.request("status")["step"]
        time.sleep(0.5)
        paused = c.request("status")
        assert paused["paused"] and paused["step"] == step  # no step while paused
        assert c.request("resume")["ok"]
        wait_for(lambda: c.request("status")["step"] > step)
        bad = c.request("lr", "abc")
        assert not bad["ok"] and "not a number" in bad["error"]
        assert c.request("quit")["ok"]
    thread.join(timeout=60)
    assert not thread.is_alive()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["lr"] == pytest.approx(0.0042)  # the optimizer's learning rate changed
    assert not os.path.exists(sock_path) and not (run / "control.json").exists()  # cleaned up
    assert list_checkpoints(run)[-1].name == f"step-{trainer.step:08d}"  # quit saved the last step


def test_malformed_unknown_and_abandoned_requests(running):
    run, trainer, _ = running
    s, f = raw(run)
    s.sendall(b'{"cmd": "status"\n')  # broken JSON
    assert "malformed request" in json.loads(f.readline())["error"]
    s.sendall(b'[1, 2]\n{"v": 1, "id": "x", "cmd": "fly"}\n{"v": 9, "cmd": "status"}\n{"id": 3}\n')
    replies = [json.loads(f.readline()) for _ in range(4)]
    assert "must be a JSON object" in replies[0]["error"]
    assert replies[1]["id"] == "x" and "unknown command 'fly'" in replies[1]["error"]
    assert "protocol version 9" in replies[2]["error"]
    assert "needs a 'cmd'" in replies[3]["error"]
    s.sendall(b"[" * 30_000 + b"]" * 30_000 + b"\n")  # nested beyond the parser's recursion limit
    assert "nested too deeply" in json.loads(f.readline())["error"]
    s.sendall(b"x" * (70 * 1024))  # an endless line is cut off
    assert "longer than" in json.loads(f.readline())["error"]
    s.close()
    s, f = raw(run)
    s.sendall(b"x" * (70 * 1024) + b"\n")  # a whole line over the limit, in one piece
    assert "longer than" in json.loads(f.readline())["error"]
    s.close()
    half, _ = raw(run)
    half.sendall(b'{"v": 1, "cmd": "sa')  # the client leaves mid-message
    half.close()
    with ControlClient(run) as c:  # training is undisturbed
        step = c.request("status")["step"]
        wait_for(lambda: c.request("status")["step"] > step)
    assert trainer.stop_requested is False


def test_a_client_that_never_reads_does_not_stall_training(running):
    """Thousands of requests whose replies are never read: the replies queue per client, the client is
    dropped when its queue is full, and the training loop never waits on its socket."""
    run, trainer, _ = running
    s, _ = raw(run)
    s.setblocking(False)
    flood = b'{"v": 1, "cmd": "status"}\n' * 5000
    sent = 0
    deadline = time.time() + 120
    while sent < len(flood) and time.time() < deadline:
        try:
            sent += s.send(flood[sent:])
        except BlockingIOError:
            time.sleep(0.01)
        except OSError:  # dropped by the server
            break
    step = trainer.step
    wait_for(lambda: trainer.step >= step + 3, timeout=120)  # 3 steps of a tiny model: seconds
    with ControlClient(run) as c:  # others are still served
        assert c.request("status")["ok"]
    s.close()


def test_second_trainer_on_the_same_run_is_refused(running):
    run, trainer, _ = running
    with pytest.raises(ControlError, match="already running"):
        ControlServer(run, trainer.commands)


def test_other_users_cannot_connect(running):
    run, _, _ = running
    if os.getuid() != 0:
        pytest.skip("needs root to act as a second user")
    path = json.loads((run / "control.json").read_text())["socket"]
    pid = os.fork()
    if pid == 0:  # the child becomes 'nobody' and tries to connect
        code = 3
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            code = 1  # connected: the permission check failed
        except PermissionError:
            code = 0
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_client_without_a_running_training(tmp_path):
    with pytest.raises(ControlError, match="no running training"):
        ControlClient(tmp_path)


def test_a_client_waiting_for_a_silent_trainer_can_be_aborted(tmp_path):
    """A trainer that accepts but never greets (stopped with Ctrl+Z, say): `abort()` from another thread frees
    the waiting client at once instead of after its timeout."""
    path = tmp_path / "c.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    (tmp_path / "control.json").write_text(json.dumps({"protocol": 1, "socket": str(path), "pid": 1}))
    client = ControlClient(tmp_path, timeout=60, connect=False)
    failed = []

    def wait():
        try:
            client.connect()
        except (ControlError, OSError) as exc:
            failed.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.3)
    client.abort()
    thread.join(timeout=30)  # generous, and still half the client's own 60 s: only abort() ends it this soon
    assert not thread.is_alive() and failed
    listener.close()


def test_a_crafted_control_json_cannot_delete_files(tmp_path):
    """control.json is read from disk: the stale socket it names is removed only when it is this run's own
    kind of socket. A crafted file naming any other path (a file, a link, someone else's socket) leaves it."""
    from valle_cli.train.commands import Commands

    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    other_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other_socket.bind(str(elsewhere / "control.sock"))  # a socket, but not where a run puts its own
    other_socket.close()  # stale: nothing listens
    # a private-looking temp folder that is a link to another folder holding a dead socket
    fake = Path(tempfile.gettempdir()) / f"valle-control-crafted-{os.getpid()}"
    fake.unlink(missing_ok=True)
    fake.symlink_to(elsewhere, target_is_directory=True)
    try:
        for target in (victim, elsewhere / "control.sock", fake / "control.sock"):
            (run / "control.json").write_text(json.dumps({"protocol": 1, "socket": str(target), "pid": 1}))
            ControlServer(run, Commands()).close()
            assert victim.read_text() == "precious" and (elsewhere / "control.sock").exists()
    finally:
        fake.unlink()
    # the run's own socket path made a link to the victim: refused and named, the link kept
    link = run / "control.sock"
    link.symlink_to(victim)
    (run / "control.json").write_text(json.dumps({"protocol": 1, "socket": str(link), "pid": 1}))
    with pytest.raises(ControlError, match="in the way .*a link"):
        ControlServer(run, Commands())
    assert link.is_symlink() and victim.read_text() == "precious"
    link.unlink()
    # a stale socket of this run's own (a killed trainer) is still cleaned up and replaced
    (run / "control.json").write_text(
        json.dumps({"protocol": 1, "socket": str(run / "control.sock"), "pid": 1})
    )
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(run / "control.sock"))
    stale.close()
    server = ControlServer(run, Commands())
    assert stat.S_ISSOCK((run / "control.sock").lstat().st_mode)
    server.close()
    # a file of the user's own at the socket's path is in the way: refused, named, and kept
    (run / "control.json").unlink(missing_ok=True)  # close() removed it
    (run / "control.sock").write_text("notes")
    with pytest.raises(ControlError, match="in the way") as exc:
        ControlServer(run, Commands())
    assert "move or rename it" in exc.value.remedy and (run / "control.sock").read_text() == "notes"
