"""Loss or accuracy per RVQ level, one coloured line per level, drawn with plotext into the widget's size."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from valle_cli.tui.source import History

# 256-colour codes shared by plotext (the lines) and Rich (the legend), one per level
COLOURS = (231, 208, 40, 196, 171, 226, 51, 33, 99, 214, 118, 203, 141, 229, 87, 250)
FAMILIES = ("loss", "acc")


class Curves(Widget):
    """Redraws when told the history changed (at most a few times a second, by the dashboard)."""

    DEFAULT_CSS = """
    Curves {
        height: 1fr;
        min-height: 6;
    }
    """

    family: reactive[str] = reactive("loss")

    def __init__(self, history: History, **kwargs):
        super().__init__(**kwargs)
        self.history = history
        self.points = 0  # points drawn in the last render (tests and the title read it)

    def cycle(self) -> None:
        self.family = FAMILIES[(FAMILIES.index(self.family) + 1) % len(FAMILIES)]

    def title(self) -> str:
        what = "loss" if self.family == "loss" else "accuracy"
        smooth = f", ewm {self.history.smooth}" if self.history.smooth > 1 else ""
        return f"{what} per RVQ level (l0: AR){smooth}"

    def legend(self) -> Text:
        text = Text()
        for i, (label, _) in enumerate(self.history.lines(self.family)):
            text.append("━", style=f"color({COLOURS[i % len(COLOURS)]})")
            text.append(f"{label} ")
        return text

    def render(self) -> Text:
        import plotext as plt

        width, height = self.size.width, self.size.height
        lines = self.history.lines(self.family)
        if not lines or width < 20 or height < 5:
            self.points = 0
            return Text("waiting for the first training steps…", style="dim")
        plt.clear_figure()
        plt.theme("clear")
        plt.plot_size(width, height)
        points = 0
        for i, (_, key) in reversed(list(enumerate(lines))):  # l0 (AR) last: on top where lines cross
            xs, ys = self.history.curves[key].points(2 * width)  # braille: 2 dots per cell across
            if xs:
                plt.plot(xs, ys, color=COLOURS[i % len(COLOURS)], marker="braille")
                points += len(xs)
        if self.family == "acc":
            plt.ylim(0, 1)
        first, last = self.history.train[0]["step"], self.history.train[-1]["step"]
        ticks = step_ticks(first, last, max(2, width // 9))
        plt.xticks(ticks, [f"{t:,}" for t in ticks])
        text = Text.from_ansi(plt.build(), no_wrap=True)
        plt.clear_figure()
        self.points = points
        return text


def step_ticks(first: int, last: int, most: int) -> list[int]:
    """Round step numbers for the x axis: at most `most` of them, 1, 2 or 5 times a power of ten apart."""
    span = max(1, last - first)
    gap = 1
    while span // gap + 1 > most:
        gap = _next_gap(gap)
    start = -(-first // gap) * gap
    return list(range(start, last + 1, gap)) or [first]


def _next_gap(gap: int) -> int:
    """1 -> 2 -> 5 -> 10 -> 20 -> 50 -> ..."""
    digits = str(gap)
    lead, zeros = int(digits[0]), len(digits) - 1
    return {1: 2, 2: 5, 5: 10}[lead] * 10**zeros
