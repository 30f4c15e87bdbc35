"""`valle export --hf DIR` and hub-id model sources: the folder holds weights, readable config and a model card
and loads back exactly; a real huggingface_hub cache layout serves `owner/name` offline; an unknown id offline
fails at once with one line. The model is a tiny random one built from the metadata a run writes (no training
needed: these tests are about files, not about what the weights learned)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from valle_cli.cli.app import main
from valle_cli.infer.load import ModelLoadError, build_from_meta, export_hf, export_model, load_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict]:
    """An exported tiny model (as `valle export` writes it) and its state dict."""
    from safetensors.torch import save_file

    from valle_cli.config import config_to_dict, load_config
    from valle_cli.text import default_symbol_map

    meta = {
        "format": "valle-model",
        "version": 1,
        "config": config_to_dict(load_config("tiny")),
        "symbols": default_symbol_map().to_dict(),
        "codec": {
            "name": "mel",
            "sample_rate": 24000,
            "frame_rate": 75.0,
            "n_codebooks": 8,
            "codebook_size": 1024,
        },
        "languages": ["en", "de"],
        "created_by": "valle test",
        "stats": {"step": 1234, "tokens": 56789},
        "lora": None,
        "dtype": "fp32",
    }
    torch.manual_seed(0)
    model = build_from_meta(meta)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("src") / "tiny.safetensors"
    save_file(state, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})
    return path, state


def read(path: Path) -> tuple[dict, dict]:
    """A safetensors file's metadata and tensors as plain data (its header's key order is not stable)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k).tolist() for k in f.keys()}  # noqa: SIM118


def assert_same_weights(model: torch.nn.Module, state: dict, atol: float = 0.0) -> None:
    got = model.state_dict()
    assert got.keys() == state.keys()
    for k, v in state.items():
        torch.testing.assert_close(got[k], v, atol=atol, rtol=0 if atol == 0 else 1e-3)


def test_hf_folder_holds_weights_config_and_card(source, tmp_path):
    src, state = source
    folder, file = tmp_path / "valle-tiny", tmp_path / "tiny.safetensors"
    main(["export", str(src), "--hf", str(folder), "-o", str(file)])
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert read(file) == read(folder / "model.safetensors")  # exactly what -o writes

    loaded = load_model(folder)
    assert loaded.source == folder
    assert_same_weights(loaded.model, state)  # fp32: exact
    config = json.loads((folder / "config.json").read_text())
    assert {k: config[k] for k in loaded.meta} == loaded.meta
    assert config["parameters"] == sum(p.numel() for p in loaded.model.parameters())
    assert config["symbols"]["symbols"][:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]

    card = (folder / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "valle" and front["pipeline_tag"] == "text-to-speech"
    assert front["language"] == ["de", "en"] and "text-to-speech" in front["tags"]
    assert 'valle synth "Hello." --ref voice.wav --model OWNER/valle-tiny' in card
    assert "--model ./valle-tiny" in card and "`tiny` preset" in card and "step 1,234" in card

    half = export_hf(src, tmp_path / "half", "fp16")
    loaded = load_model(half)
    assert loaded.meta["dtype"] == "fp16"
    assert json.loads((half / "config.json").read_text())["dtype"] == "fp16"
    assert_same_weights(loaded.model, state, atol=2e-3)


def test_export_needs_a_target_and_keeps_a_full_folder(source, tmp_path, capsys):
    src, _ = source
    with pytest.raises(SystemExit) as exc:
        main(["export", str(src)])
    assert exc.value.code == 1 and "nothing to write: no --output and no --hf" in capsys.readouterr().err

    folder = tmp_path / "full"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["export", str(src), "--hf", str(folder), "-o", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert "already exists and is not empty" in err and "--force" in err
    assert (folder / "notes.txt").read_text() == "mine" and not (tmp_path / "x.safetensors").exists()

    main(["export", str(src), "--hf", str(folder), "--force"])
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["full"]  # the old folder and the temporary one are gone
    empty = tmp_path / "empty"
    empty.mkdir()
    export_hf(src, empty)  # an empty folder is fine without --force
    assert (empty / "model.safetensors").is_file()


def test_bad_output_paths_are_named_before_any_model_loads_or_folder_is_written(source, tmp_path, capsys):
    src, _ = source
    (tmp_path / "taken").mkdir()
    for bad, said in (
        (tmp_path / "taken", "it is a folder"),
        (tmp_path / "file.txt" / "m.safetensors", "cannot"),
    ):
        if said == "cannot":
            (tmp_path / "file.txt").write_text("x")  # a file where the output's folder should be
        with pytest.raises(SystemExit):  # the source does not exist either: the path is checked first
            main(["export", str(tmp_path / "no-such-run"), "-o", str(bad)])
        assert said in capsys.readouterr().err
        with pytest.raises(SystemExit):  # with --hf too: nothing is written there
            main(["export", str(src), "--hf", str(tmp_path / "hf"), "-o", str(bad)])
        assert said in capsys.readouterr().err and not (tmp_path / "hf").exists()
    with pytest.raises(SystemExit):  # a bad setting is named before the output's folder is made
        main(["export", str(src), "-o", str(tmp_path / "new" / "m.pt"), "--dtype", "fp8"])
    assert "unknown dtype 'fp8'" in capsys.readouterr().err and not (tmp_path / "new").exists()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache under tmp_path, offline. huggingface_hub read its own variables when it was
    imported; valle_cli.hub reads them at each call, so setting them here is enough."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from valle_cli import hub

    assert hub.cache_dir() == tmp_path / "hf" / "hub"
    return hub.cache_dir()


def put_in_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """huggingface_hub's layout: blobs/<hash>, snapshots/<commit>/<file> -> ../../blobs/<hash>, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(folder.iterdir())):
        blob = f"{i:040x}"
        shutil.copyfile(f, repo / "blobs" / blob)
        os.symlink(f"../../blobs/{blob}", snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


def test_hub_id_loads_from_the_cache_offline(source, tmp_path, hub_cache):
    from huggingface_hub import scan_cache_dir, snapshot_download

    src, state = source
    snap = put_in_cache(hub_cache, "someone/valle-tiny", export_hf(src, tmp_path / "valle-tiny"))
    # huggingface_hub itself reads this layout: not just our assumption about it
    assert Path(snapshot_download("someone/valle-tiny", cache_dir=hub_cache, local_files_only=True)) == snap
    (repo,) = scan_cache_dir(hub_cache).repos
    assert repo.repo_id == "someone/valle-tiny" and {r.commit_hash for r in repo.revisions} == {COMMIT}

    for spec in ("someone/valle-tiny", f"someone/valle-tiny@{COMMIT}", "someone/valle-tiny@main"):
        loaded = load_model(spec)
        assert loaded.source == spec and loaded.meta["stats"]["step"] == 1234
        assert_same_weights(loaded.model, state)
    out = main(["export", "someone/valle-tiny", "-o", str(tmp_path / "again.safetensors")])
    assert out is None and load_model(tmp_path / "again.safetensors").meta["codec"]["name"] == "mel"

    put_in_cache(hub_cache, "someone/readme-only", _only_readme(tmp_path))
    with pytest.raises(ModelLoadError, match="hub repo someone/readme-only holds no model.safetensors"):
        load_model("someone/readme-only")


def _only_readme(tmp_path: Path) -> Path:
    folder = tmp_path / "readme-only"
    folder.mkdir()
    (folder / "README.md").write_text("# not a model\n")
    return folder


def test_local_paths_win_and_missing_files_stay_missing(source, tmp_path, hub_cache, monkeypatch):
    src, _ = source
    monkeypatch.chdir(tmp_path)
    Path("someone").mkdir()
    export_hf(src, Path("someone") / "valle-tiny")  # a local folder shaped like a hub id
    assert load_model("someone/valle-tiny").source == Path("someone/valle-tiny")
    for missing in ("runs/m.safetensors", "./someone/nothing", "a/b/c"):
        with pytest.raises(ModelLoadError, match="does not exist"):
            load_model(missing)


def test_unknown_hub_id_offline_fails_at_once(hub_cache, tmp_path, monkeypatch):
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError) as exc:
        load_model("nobody/nothing")
    assert time.monotonic() - t0 < 30  # generous: catches waiting on network timeouts
    assert exc.value.message == (
        "model nobody/nothing is neither a local path nor in the Hugging Face cache, and the hub cannot be "
        "reached (offline)"
    )
    assert "connect once" in exc.value.remedy and str(hub_cache) in exc.value.remedy

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # not told offline, but the hub's name does not resolve

    def no_dns(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("valle_cli.hub.socket.getaddrinfo", no_dns)
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match="hub cannot be reached"):
        load_model("nobody/nothing@v1")
    assert time.monotonic() - t0 < 30  # generous: catches waiting on network timeouts

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "valle"), "export", "nobody/nothing", "-o", "x.safetensors"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert [x for x in lines if x.startswith("error:")] == [
        "error: model nobody/nothing is neither a local path nor in the Hugging Face cache, and the hub "
        "cannot be reached (offline)"
    ]
    assert len(lines) == 2 and lines[1].strip().startswith("remedy: connect once"), proc.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_hub_export_creates_missing_parents_and_leaves_nothing_on_error(source, tmp_path):
    """README's `valle export RUN --hf hub/valle-mine` failed when hub/ did not exist."""
    src, _ = source
    out = export_hf(src, tmp_path / "hub" / "deeper" / "valle-mine")
    assert (out / "model.safetensors").is_file() and load_model(out).meta
    with pytest.raises(ModelLoadError):
        export_hf(tmp_path / "no-such-run", tmp_path / "new" / "valle-x")
    assert not (tmp_path / "new").exists()  # nothing made for an export that failed
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ModelLoadError, match="not a writable folder"):
        export_hf(src, tmp_path / "a-file" / "sub" / "valle-x")


def test_model_files_get_the_usual_permissions(tiny_model, tmp_path):
    """safetensors writes 0600: model.safetensors files were private while everything beside them was not."""
    import stat

    from valle_cli.train.checkpoint import latest

    mask = os.umask(0)
    os.umask(mask)
    usual = 0o666 & ~mask
    checkpoint = latest(tiny_model)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in checkpoint.iterdir() if f.is_file()}
    assert set(modes.values()) == {usual}, modes
    out = export_model(tiny_model, tmp_path / "m.safetensors")
    assert stat.S_IMODE(out.stat().st_mode) == usual
    hub = export_hf(tiny_model, tmp_path / "hub")
    assert stat.S_IMODE((hub / "model.safetensors").stat().st_mode) == usual
