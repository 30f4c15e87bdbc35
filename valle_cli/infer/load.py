"""Loading a trained model for inference, and exporting one to a single file or a hub-ready folder.

A model source is a run folder (its `latest` checkpoint), a `step-*` checkpoint folder, a folder holding
`model.safetensors` (an `export_hf` folder or a downloaded hub repo), an exported file (`.safetensors` or
`.pt`), the name of a model plugin (a package registering a trained model under the `valle.models`
entry-point group, such as the shipped `valle-default`), or a Hugging Face hub id (`owner/name`, optionally
`owner/name@revision`). Every one carries its metadata: format version, the resolved config, the symbol map,
the codec it was trained with, training stats, and for LoRA checkpoints the adapter settings and the base
model they adapt. A LoRA checkpoint loads its base, applies the adapters and merges them.

A path that exists is always local; then model plugin names. Only a missing path shaped like a hub id is
looked up on the hub: in the local huggingface_hub cache first (so it works offline and with
`HF_HUB_OFFLINE=1`), then downloaded (`model.safetensors`, `config.json`, `README.md` only) when the hub can be
reached. Offline and not cached fails at once with one line saying so (see `valle_cli.hub`). A cached repo is
used as it is, without asking the hub for a newer commit; name a revision (`owner/name@<commit>`) to pin or
refresh one.

With no model named, `default_model` picks one: `$VALLE_DEFAULT_MODEL` if set (any source above: a path, a
plugin name or a hub id), else the shipped model plugin (`valle-default`, plugins/valle-default-model). No
hub repository is asked for by default: valle publishes none, and a machine with no network still speaks.

`export_model` writes one file with the weights (optionally cast to fp16/bf16) and that metadata: the merged
model, or with `lora_only` just the adapters (which `load_model` puts beside their base again). `export_hf`
writes a folder ready to upload to the hub: the same `model.safetensors`, the metadata again as readable
`config.json` (the safetensors header stays the source of truth when loading), and a `README.md` model card.
The folder is written beside its target under a temporary name and renamed into place, so an interrupted
export never leaves a half-written model card folder behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from valle_cli.errors import ValleError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHTS = "model.safetensors"
HUB_FILES = [WEIGHTS, "config.json", "README.md"]  # what a hub model repo needs; nothing else is downloaded
DEFAULT_MODEL_ENV = "VALLE_DEFAULT_MODEL"  # the model used when none is named, per user; see default_model()
SHIPPED_MODEL = "valle-default"  # the model plugin used otherwise


class ModelLoadError(ValleError):
    pass


@dataclass
class Loaded:
    model: torch.nn.Module
    meta: dict
    source: Path | str  # the local path as given, or the hub id string (`owner/name[@revision]`)


def _hub_folder(spec: str, repo_id: str, revision: str | None) -> Path:
    """The local folder of a hub model repo: from the cache, else downloaded."""
    from valle_cli import hub

    no_model = (
        f"hub repo {spec} holds no {WEIGHTS}, so it is not a valle model",
        "check the id; a valle model repo is a folder written by `valle export RUN --hf DIR`",
    )
    found = hub.cached_snapshot(repo_id, revision, HUB_FILES)
    if found is not None and (found / WEIGHTS).is_file():
        return found
    try:
        found = hub.download(repo_id, revision, HUB_FILES)
    except hub.HubOffline:
        if found is not None:
            raise ModelLoadError(*no_model) from None
        raise ModelLoadError(
            f"model {spec} is neither a local path nor in the Hugging Face cache, and the hub cannot be "
            "reached (offline)",
            f"connect once and run it again (it is then cached in {hub.cache_dir()}), or download the repo "
            "folder on another machine and pass its local path",
        ) from None
    except Exception as exc:
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        if isinstance(exc, RevisionNotFoundError):
            raise ModelLoadError(
                f"hub repo {repo_id} has no revision {revision!r}", "check the branch, tag or commit after @"
            ) from None
        if isinstance(exc, RepositoryNotFoundError):
            raise ModelLoadError(
                f"model {spec} is neither a local path nor a repo on the Hugging Face hub (or it is private)",
                "check the path or the id (owner/name); for a private repo log in with `hf auth login`",
            ) from None
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelLoadError(
            f"cannot download {spec} from the Hugging Face hub ({type(exc).__name__}: {reason})",
            "check the connection and try again, or download the repo folder elsewhere and pass its path",
        ) from None
    if not (found / WEIGHTS).is_file():
        raise ModelLoadError(*no_model)
    return found


def resolve_source(source: str | Path) -> tuple[Path, Path | str]:
    """(local path to read, how to name the source): a local path as it is, a hub id via the hub cache.

    Give a string where you can: `Path("./a/b")` is `a/b`, so only the string keeps `./` marking it local."""
    from valle_cli import plugins
    from valle_cli.hub import parse_hub_id

    p = Path(source)
    if p.exists():
        return p, p
    spec = os.fspath(source)
    if spec in plugins.names("model"):
        return plugin_model(spec), spec
    parsed = parse_hub_id(spec)
    if parsed is None:
        return p, p  # reading it says it does not exist
    return _hub_folder(spec, *parsed), spec


def plugin_model(name: str) -> Path:
    """The model file a `valle.models` plugin registers (its entry point is a function returning the path)."""
    from valle_cli import plugins

    target = plugins.load("model", name)
    try:
        path = Path(target() if callable(target) else target)
    except Exception as exc:
        raise ModelLoadError(
            f"model plugin {name!r} failed to give its model file: {type(exc).__name__}: {exc}",
            "reinstall the package that provides it (`valle plugins --kind model` lists them)",
        ) from None
    if not path.exists():
        raise ModelLoadError(
            f"model plugin {name!r} names {path}, which does not exist",
            "reinstall the package that provides it (`valle plugins --kind model` lists them)",
        )
    return path


def default_model() -> tuple[str, str]:
    """(source, a line saying which model and why) for when no model is named; see the module doc.

    The shipped model comes back as its file's path, so a local file or folder that happens to be named
    `valle-default` cannot stand in for it."""
    from valle_cli import plugins

    env = os.environ.get(DEFAULT_MODEL_ENV)
    if env:
        return env, f"no --model given: using ${DEFAULT_MODEL_ENV} = {env}"
    if SHIPPED_MODEL not in plugins.names("model"):
        raise ModelLoadError(
            f"no --model given, ${DEFAULT_MODEL_ENV} is not set, and the shipped model ({SHIPPED_MODEL}) is not "
            "installed",
            "pass --model RUN|FILE|HUB-ID, or install the shipped model: pip install ./plugins/valle-default-model "
            "(scripts/setup.sh does)",
        )
    try:
        path = plugin_model(SHIPPED_MODEL)
    except ValleError as exc:
        raise ModelLoadError(
            f"no --model given, and the shipped model is unusable: {exc.message}",
            "pass --model RUN|FILE|HUB-ID, or reinstall the shipped model: pip install ./plugins/valle-default-model",
        ) from None
    info = plugins.discover("model")[SHIPPED_MODEL][0]
    return str(path), (
        f"no --model given: using the shipped model {SHIPPED_MODEL} "
        f"({info.distribution} {info.version}, a small model trained offline by valle)"
    )


def _read(path: Path) -> tuple[dict, dict]:
    """(state dict, meta) from a local checkpoint folder, export file or export folder."""
    p = Path(path)
    if p.name == "latest" and p.is_file():  # a run folder's pointer to its newest checkpoint
        p = p.parent
    if p.is_dir():
        from valle_cli.train.checkpoint import latest

        if not (p / "model.safetensors").is_file():
            found = latest(p)
            if found is None:
                raise ModelLoadError(
                    f"{p} holds no model (no model.safetensors and no step-* checkpoint)",
                    "point at a run folder, a step-* folder or an exported file",
                )
            p = found
        p = p / "model.safetensors"
    if not p.is_file():
        raise ModelLoadError(f"model {p} does not exist", "check the path")
    try:
        if p.suffix == ".pt":
            blob = torch.load(p, map_location="cpu", weights_only=False)
            return blob["state_dict"], blob["meta"]
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except Exception as exc:
        raise ModelLoadError(
            f"{p} cannot be read as a valle model ({type(exc).__name__}); it may be truncated",
            "export or download it again",
        ) from None
    if meta.get("format") != "valle-model":
        raise ModelLoadError(f"{p} is not a valle model (format {meta.get('format')!r})")
    if int(meta.get("version", 99)) > 1:
        raise ModelLoadError(
            f"{p} is model format version {meta.get('version')}; this valle reads 1", "upgrade valle"
        )
    return state, meta


def build_from_meta(meta: dict) -> torch.nn.Module:
    from valle_cli.config import load_config
    from valle_cli.model.valle import VALLE

    cfg = load_config(None, [f"model.{k}={json.dumps(v)}" for k, v in meta["config"]["model"].items()])
    return VALLE(cfg.model, len(meta["symbols"]["symbols"]), int(meta["codec"]["codebook_size"]))


def load_model(source: str | Path, device: str | torch.device = "cpu", merge: bool = True) -> Loaded:
    """A ready-to-run model (eval mode) and its metadata, from a local path or a hub id (see the module doc)."""
    path, label = resolve_source(source)
    state, meta = _read(path)
    model = build_from_meta(meta)
    lora = meta.get("lora")
    if lora:
        from valle_cli.model.lora import apply_lora, merge_lora

        base = lora.get("base")
        if not base:
            raise ModelLoadError(
                f"{source} holds LoRA adapters without a base model", "export the merged model"
            )
        base_state, _ = _read(resolve_source(base)[0])
        model.load_state_dict(base_state)
        apply_lora(model, int(lora["rank"]), float(lora["alpha"]), 0.0, list(lora["targets"]))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any("lora_" in k for k in missing):
            raise ModelLoadError(f"{source}: its adapters do not fit the base model {base}")
        if merge:
            merge_lora(model)
            meta = {**meta, "lora": None}
    else:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelLoadError(f"{source}: weights do not fit its own config ({str(exc)[:200]})") from None
    return Loaded(model.to(device).float().eval(), meta, label)


def ready_to_write(out: Path) -> None:
    """Create the output's folder (like `-o runs/new/model.safetensors` expects) and check it can be written."""
    from valle_cli.fsutil import check_writable

    if out.is_dir():
        raise ModelLoadError(
            f"cannot write {out}: it is a folder", "give a file name, e.g. model.safetensors"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot create {out.parent}: {exc.strerror or exc}", "pick another path"
        ) from None
    check_writable(out, ModelLoadError)


def check_export(out: Path, dtype: str, fmt: str | None) -> str:
    """Check an export's settings, then make its folder and check it can be written; returns the format."""
    fmt = fmt or ("pt" if out.suffix == ".pt" else "safetensors")
    if fmt not in ("safetensors", "pt"):
        raise ModelLoadError(f"unknown export format {fmt!r}", "use safetensors or pt")
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}", "use fp32, fp16 or bf16")
    ready_to_write(out)
    return fmt


def export_model(
    source: str | Path,
    output: str | Path,
    dtype: str = "fp32",
    fmt: str | None = None,
    lora_only: bool = False,
) -> Path:
    """One file with weights and metadata. `lora_only`: the adapters of a LoRA run, not the merged model."""
    from valle_cli.fsutil import atomic_path

    out = Path(output)
    fmt = check_export(out, dtype, fmt)  # before loading: a bad output path should not cost the load first
    if lora_only:
        state, meta = _read(resolve_source(source)[0])
        if not meta.get("lora"):
            raise ModelLoadError(f"{source} is not a LoRA run", "drop --lora to export the whole model")
    else:
        loaded = load_model(source, merge=True)
        state, meta = loaded.model.state_dict(), loaded.meta
    state, meta = _cast(state, meta, dtype)
    with atomic_path(out, ModelLoadError) as tmp:
        if fmt == "pt":
            torch.save({"state_dict": state, "meta": meta}, tmp)
        else:
            _save_safetensors(state, meta, tmp)
    return out


def _cast(state: dict, meta: dict, dtype: str) -> tuple[dict, dict]:
    state = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    return state, {**meta, "dtype": dtype}


def _save_safetensors(state: dict, meta: dict, path: str | Path) -> None:
    from valle_cli.fsutil import save_safetensors

    save_safetensors(state, path, {k: json.dumps(v) for k, v in meta.items()})


def export_hf(source: str | Path, folder: str | Path, dtype: str = "fp32", force: bool = False) -> Path:
    """A folder ready to upload to the Hugging Face hub: `model.safetensors` (as `export_model` writes it),
    `config.json` (the metadata, readable) and `README.md` (a model card). `load_model(folder)` loads it, and
    so does `load_model("owner/name")` once it is uploaded there.

    Refuses to replace a non-empty folder unless `force`. Written under a temporary name beside `folder`, then
    renamed into place."""
    out = Path(folder)
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}", "use fp32, fp16 or bf16")
    if out.exists() and not out.is_dir():
        raise ModelLoadError(f"cannot write the hub folder {out}: it is a file", "give a folder name")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ModelLoadError(
            f"hub folder {out} already exists and is not empty",
            "pick a new folder, or add --force to replace it",
        )
    parent = out.parent if str(out.parent) else Path(".")
    ancestor = next((p for p in (parent, *parent.parents) if p.exists()), Path("."))
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ModelLoadError(f"cannot write {out}: {ancestor} is not a writable folder", "pick another path")
    loaded = load_model(source, merge=True)
    n_params = sum(p.numel() for p in loaded.model.parameters())
    state, meta = _cast(loaded.model.state_dict(), loaded.meta, dtype)
    if meta.get("lora"):  # unmerged adapters cannot happen with merge=True; keep the card honest regardless
        raise ModelLoadError(f"{source} still holds LoRA adapters", "export the merged model")
    made = [p for p in (parent, *parent.parents) if not p.exists()]  # made here; removed again on failure
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()
        raise ModelLoadError(
            f"cannot write {out}: {exc.strerror or exc}", "check the folder's permissions and free space"
        ) from None
    old: Path | None = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        _save_safetensors(state, meta, tmp / WEIGHTS)
        (tmp / "config.json").write_text(json.dumps({**meta, "parameters": n_params}, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(meta, n_params, out.name))
        for name in HUB_FILES:  # durable before the folder becomes visible
            fd = os.open(tmp / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if out.is_dir() and any(out.iterdir()):  # --force: move the old folder aside, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            os.replace(out, old)
        os.replace(tmp, out)  # an empty existing folder is replaced by rename itself
    except OSError as exc:
        if old is not None and old.exists() and not out.exists():
            os.replace(old, out)  # put the old folder back
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made:  # the parents this export created, innermost first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise ModelLoadError(
            f"cannot write {out}: {exc.strerror or exc}", "check free disk space and permissions"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _preset_of(model_cfg: dict) -> str | None:
    """The shipped preset whose model shape this is, if any."""
    from valle_cli.config import load_config, preset_names

    keys = ("backbone", "d_model", "n_layers", "n_heads", "ffn_dim", "n_levels")
    for name in preset_names():
        shape = load_config(name).model
        if all(getattr(shape, k, None) == model_cfg.get(k) for k in keys):
            return name
    return None


def model_card(meta: dict, n_params: int, name: str = "NAME") -> str:
    """README.md for a hub model repo: YAML front matter, what the model is, how to use it, how it was made."""
    model_cfg = meta.get("config", {}).get("model", {})
    codec = meta.get("codec", {})
    stats = meta.get("stats") or {}
    languages = sorted({str(x).split("-")[0] for x in meta.get("languages") or []})
    preset = _preset_of(model_cfg)
    size = f"{n_params / 1e6:.1f}M parameters" if n_params >= 1e5 else f"{n_params:,} parameters"
    shape = (
        f"{model_cfg.get('backbone', '?')} backbone, d_model {model_cfg.get('d_model', '?')}, "
        f"{model_cfg.get('n_layers', '?')} layers, {model_cfg.get('n_heads', '?')} heads, "
        f"{model_cfg.get('n_levels', '?')} codebook levels"
    )
    codec_line = (
        f"`{codec.get('name', '?')}` ({codec.get('n_codebooks', '?')} codebooks of "
        f"{codec.get('codebook_size', '?')}, {codec.get('frame_rate', '?')} frames/s at "
        f"{codec.get('sample_rate', '?')} Hz)"
    )
    if codec.get("path"):
        codec_line += (
            f"; its weights were read from `{codec['path']}` at training time and are not in this repo"
        )
    trained = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in stats.items())
    front = ["---", "library_name: valle", "pipeline_tag: text-to-speech", "tags:"]
    front += [f"  - {t}" for t in ("valle", "text-to-speech", "zero-shot-tts", "voice-cloning", "audio")]
    if languages:
        front += ["language:", *(f"  - {lang}" for lang in languages)]
    front.append("---")
    lang_flag = f" --language {languages[0]}" if languages and "en" not in languages else ""
    body = [
        f"# {name}",
        "",
        "A [VALL-E](https://arxiv.org/abs/2301.02111) zero-shot text-to-speech model made with `valle`: it "
        "speaks text in the voice of a few seconds of reference audio.",
        "",
        f"- size: {size}" + (f" (the `{preset}` preset's shape)" if preset else ""),
        f"- model: {shape}",
        f"- codec: {codec_line}",
        f"- languages: {', '.join(languages) if languages else 'not recorded'}",
        f"- training: {trained if trained else 'not recorded'}",
        f"- weights: {meta.get('dtype', 'fp32')}, `{WEIGHTS}` (config, codec and symbol map in its header; "
        "`config.json` repeats them readably)",
        "",
        "## Use",
        "",
        "With `valle` installed, after uploading this folder as `OWNER/" + name + "`:",
        "",
        "```sh",
        f'valle synth "Hello." --ref voice.wav --model OWNER/{name}{lang_flag} -o hello.wav',
        "```",
        "",
        "The first run downloads the model into the Hugging Face cache (`~/.cache/huggingface/hub`); later runs "
        "work offline. With a local copy of this folder, pass its path instead:",
        "",
        "```sh",
        f'valle synth "Hello." --ref voice.wav --model ./{name}{lang_flag} -o hello.wav',
        "```",
        "",
        'From Python: `from valle_cli.infer.load import load_model; loaded = load_model("OWNER/'
        + name
        + '")`.',
        "",
        "## How it was made",
        "",
        f"Trained with {meta.get('created_by', 'valle')} and exported with "
        f"`valle export RUN --hf {name} --dtype {meta.get('dtype', 'fp32')}`; upload with "
        f"`hf upload OWNER/{name} {name}`.",
        "",
    ]
    return "\n".join([*front, "", *body])
