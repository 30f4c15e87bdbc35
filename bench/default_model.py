"""Quality of the shipped default model against its targets, measured with `valle eval`.

The evaluation set is remade offline (recipes/default-model/make_corpus.py): valle's 20 held-out sentences
spoken by mbrola us2, a voice the model never heard, as references and ground truth, and 5 of them in each
of the 32 training voices as impostors. `valle eval` then synthesizes every sentence with another us2 clip
as the prompt and reports WER (PocketSphinx), voice similarity (Resemblyzer), the same on the ground truth,
how often the output is closer to us2 than to every training voice, and the real-time factor. A second
`valle eval` does the same in training voices that PocketSphinx can read (mbrola us1, us3, en1 and piper
joe): 5 held-out sentences each, prompted with another of their held-out clips.

Targets (issues 8 and 14): in the unseen voice, WER at most twice the ground truth's and the output closer
to the reference voice than to any training voice for most sentences; in the training voices, WER at most
1.5 times the ground truth's.

Usage:  python bench/default_model.py [--model valle-default] [--work DIR] [--ar-temp 0.95] [--top-k 0] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from report import ROOT, command, write_section  # bench/ is on sys.path when run as a script

sys.path.insert(0, str(ROOT / "recipes" / "default-model"))

# training voices whose speech PocketSphinx transcribes well (it is poor on espeak-ng's formant voices)
TRAINING_EVAL_VOICES = ("us1-p50", "us3-p50", "en1-p50", "joe")


def pocketsphinx_env(site: Path) -> dict:
    """The environment for `valle eval` with the pocketsphinx plugin importable (installed here with pip
    --target when the virtualenv does not have it)."""
    from valle_cli import plugins

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if "pocketsphinx" not in plugins.names("transcriber"):
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
             str(site), str(ROOT / "plugins" / "valle-pocketsphinx")],
            check=True,
        )  # fmt: skip
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="valle-default", help="Model to evaluate (default: the shipped one).")
    ap.add_argument(
        "--work", type=Path, help="Keep the evaluation set and report here (default: a temp dir)."
    )
    ap.add_argument("--ar-temp", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--write", action="store_true", help="Write the section into docs/benchmarks.md.")
    args = ap.parse_args()

    import make_corpus

    from valle_cli.audio.speech import mbrola_voices

    if make_corpus.HELD_OUT_VOICE not in mbrola_voices():
        sys.exit(f"needs the mbrola {make_corpus.HELD_OUT_VOICE} voice: bash scripts/install-system-deps.sh")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        make_corpus.speak_all(make_corpus.eval_jobs(work / "eval"), workers=2)
        env = pocketsphinx_env(Path(tmp) / "site")
        unseen = run_eval(args, work, env, "report", work / "eval" / "texts.txt", work / "eval" / "refs",
                          impostors=work / "eval" / "impostors")  # fmt: skip
        # training voices: their held-out clips (the impostor set) as references and ground truth
        texts = make_corpus_texts(work)
        refs = work / "eval" / "training-refs"
        refs.mkdir(exist_ok=True)
        for voice in TRAINING_EVAL_VOICES:
            source = work / "eval" / "impostors" / voice
            if source.is_dir() and not (refs / voice).exists():
                (refs / voice).symlink_to(source.resolve(), target_is_directory=True)
        trained = run_eval(args, work, env, "report-training", texts, refs) if any(refs.iterdir()) else None

    from valle_cli.infer.load import load_model

    loaded = load_model(args.model)
    params = sum(p.numel() for p in loaded.model.parameters())
    shape = loaded.meta["config"]["model"]
    stats = loaded.meta.get("stats") or {}
    overall = unseen[0]["overall"]
    truth_wer, own = overall["truth_wer"] or 0.0, overall["closest_to_own"] or 0.0
    wer_ok = overall["wer"] <= 2 * truth_wer
    own_ok = own > 0.5
    body = [
        f"Command: `{command('default_model.py')}`  ",
        f"Machine: {platform.machine()}, CPU, {os.cpu_count()} cores. Model `{args.model}`: "
        f"d_model {shape['d_model']}, {shape['n_layers']} layers, {params / 1e6:.1f} M parameters, "
        f"{stats.get('step', '?')} training steps; offline mel codec. Sampling: ar_temp {args.ar_temp}, "
        f"top_k {args.top_k}, seeds 0..19. References and ground truth: mbrola us2 (never trained on), "
        "valle's 20 held-out sentences; impostors: the 32 training voices.",
        "",
        "Unseen voice (mbrola us2), unseen sentences:",
        "",
        unseen[1],
        "",
        f"- WER target (at most 2x the ground truth's {truth_wer:.1%}, so {2 * truth_wer:.1%}): "
        f"{overall['wer']:.1%}, **{'met' if wer_ok else 'missed'}**.",
        f"- Voice target (closer to us2 than to every training voice for most sentences): "
        f"{own:.0%} of sentences, **{'met' if own_ok else 'missed'}**.",
    ]
    if trained is not None:
        t = trained[0]["overall"]
        t_truth = t["truth_wer"] or 0.0
        body += [
            "",
            f"Training voices ({', '.join(TRAINING_EVAL_VOICES)}), unseen sentences (5 each):",
            "",
            trained[1],
            "",
            f"- WER target (at most 1.5x the ground truth's {t_truth:.1%}, so {1.5 * t_truth:.1%}): "
            f"{t['wer']:.1%}, **{'met' if t['wer'] <= 1.5 * t_truth else 'missed'}**.",
        ]
    print("\n".join(body))
    if args.write:
        write_section("Shipped default model", body)


def make_corpus_texts(work: Path) -> Path:
    """The first 5 held-out sentences: the ones every training voice speaks in the impostor set."""
    path = work / "eval" / "training-texts.txt"
    lines = (work / "eval" / "texts.txt").read_text(encoding="utf-8").splitlines()[:5]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_eval(args, work: Path, env: dict, name: str, texts: Path, refs: Path, impostors: Path | None = None):
    """`valle eval` into WORK/NAME: (report.json's contents, the report's table)."""
    cmd = [
        sys.executable, "-m", "valle_cli", "eval", args.model, "--texts", str(texts), "--refs", str(refs),
        "--transcriber", "pocketsphinx", "--verifier", "resemblyzer", "--ar-temp", str(args.ar_temp),
        "--top-k", str(args.top_k), "--device", "cpu", "-o", str(work / name),
    ]  # fmt: skip
    if impostors is not None:
        cmd += ["--impostors", str(impostors)]
    if subprocess.run(cmd, env=env).returncode != 0:
        sys.exit("valle eval failed (its error is above)")
    report = json.loads((work / name / "report.json").read_text())
    lines = (work / name / "report.md").read_text().splitlines()
    return report, "\n".join(line for line in lines if line.startswith("|"))


if __name__ == "__main__":
    main()
