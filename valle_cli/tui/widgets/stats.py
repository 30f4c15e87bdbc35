"""The numbers of the run: state, step, ETA, lr, throughput, loss and accuracy, memory."""

from __future__ import annotations

from rich.table import Table
from textual.widgets import Static

from valle_cli.tui.source import History, human_bytes, human_seconds

STATE_STYLES = {"running": "bold green", "paused": "bold yellow", "starting": "cyan", "finished": "bold"}


class Stats(Static):
    DEFAULT_CSS = """
    Stats {
        width: 100%;
        height: auto;
    }
    """

    def show(self, state: str, history: History, total_steps: int | None, status: dict | None) -> None:
        last = history.last
        step = (status or {}).get("step", last.get("step", 0))
        total = (status or {}).get("steps", total_steps)
        lr = (status or {}).get("lr", last.get("lr"))
        grid = Table.grid(padding=(0, 1, 0, 0))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column(no_wrap=True, overflow="ellipsis")
        grid.add_row("state", f"[{STATE_STYLES.get(state, 'bold red')}]{state}[/]")
        grid.add_row("step", f"{step:,}" + (f"/{total:,}" if total else ""))
        eta = "paused" if state == "paused" else human_seconds(history.eta_seconds(total))
        grid.add_row("eta", eta if state in ("running", "paused") else "-")
        grid.add_row("lr", f"{lr:.3g}" if lr is not None else "-")
        tps = last.get("tokens_per_s")
        grid.add_row("tok/s", f"{tps:,.0f}" if tps is not None else "-")
        grid.add_row("tokens", f"{last.get('tokens', 0):,}")
        loss = last.get("loss")
        grid.add_row("loss", f"{loss:.3f}" if loss is not None else "-")
        for family in ("loss", "acc"):
            levels = history.levels(family)
            ar = history.mean_of_levels(family, levels[:1])
            nar = history.mean_of_levels(family, levels[1:])
            if ar is not None:  # recent means: AR (level 0) / NAR (the other levels)
                grid.add_row(f"{family} ar/nar", f"{ar:.2f}/{nar:.2f}" if nar is not None else f"{ar:.2f}")
        grid.add_row("memory", human_bytes(last.get("mem_cpu")))
        if "mem_gpu" in last:
            grid.add_row("gpu peak", human_bytes(last["mem_gpu"]))
        if history.evals:
            ev = history.evals[-1]
            grid.add_row("eval", f"loss {ev.get('loss', float('nan')):.3f} @ {ev['step']:,}")
            # held-out level-0 loss with a wrong transcript minus the right one: ~0 = the text is ignored
            if "text_gap" in ev:
                trend = [e["text_gap"] for e in history.evals if "text_gap" in e][-6:]
                grid.add_row("text gap", f"{ev['text_gap']:+.3f}" + (
                    "  (" + " ".join(f"{v:+.2f}" for v in trend[:-1]) + ")" if len(trend) > 1 else ""
                ))  # fmt: skip
            if "identity_gap" in ev:  # pointer models: the same gap with the utterance's own boundaries
                grid.add_row("identity gap", f"{ev['identity_gap']:+.3f}")
        self.update(grid)
