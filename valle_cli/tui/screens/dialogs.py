"""Modal dialogs: a new learning rate (validated as the trainer validates it), and a choice of buttons."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.validation import ValidationResult, Validator
from textual.widgets import Button, Input, Label

from valle_cli.train.commands import parse


class LrValue(Validator):
    """The trainer's own rule (train/commands.py), so the dialog accepts exactly what training accepts."""

    def validate(self, value: str) -> ValidationResult:
        try:
            parse(f"lr {value}")
        except ValueError as exc:
            return self.failure(
                str(exc).replace("lr takes one value, e.g. `lr 1e-4`", "type one number, e.g. 1e-4")
            )
        return self.success()


class LrDialog(ModalScreen[float | None]):
    """Ask for a learning rate; dismisses with the number, or None when cancelled."""

    CSS_PATH = "dialogs.tcss"
    BINDINGS: ClassVar = [("escape", "cancel", "Cancel")]

    def __init__(self, current: float | None):
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        now = f" (now {self.current:.3g})" if self.current is not None else ""
        with Vertical(classes="dialog"):
            yield Label(f"New learning rate{now}", classes="question")
            yield Label("It becomes the schedule's peak; warmup and decay continue from it.", classes="hint")
            yield Input(placeholder="e.g. 1e-4", validators=[LrValue()], id="lr-value")
            yield Label("", id="lr-error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Set", variant="primary", id="set", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_input_changed(self, event: Input.Changed) -> None:
        result = event.validation_result
        message = (
            "" if result is None or result.is_valid or not event.value else result.failure_descriptions[0]
        )
        self.query_one("#lr-error", Label).update(message)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "set":
            self._submit()
        else:
            self.dismiss(None)

    def _submit(self) -> None:
        field = self.query_one("#lr-value", Input)
        result = field.validate(field.value)
        if result is not None and not result.is_valid:
            self.query_one("#lr-error", Label).update(result.failure_descriptions[0])
            return
        self.dismiss(float(field.value))

    def action_cancel(self) -> None:
        self.dismiss(None)


class ChoiceDialog(ModalScreen[str | None]):
    """A question and buttons; dismisses with the chosen button's id, or None (escape). `q`, the key that
    leaves the dashboard, answers `on_q` (None: backs out of the question; the leave question says "leave",
    so q q leaves)."""

    CSS_PATH = "dialogs.tcss"
    BINDINGS: ClassVar = [("escape", "cancel", "Cancel"), ("q", "q", "Cancel")]

    def __init__(
        self, question: str, hint: str, choices: list[tuple[str, str, str]], on_q: str | None = None
    ):
        super().__init__()
        self.question, self.hint, self.choices, self.on_q = question, hint, choices, on_q

    def action_q(self) -> None:
        self.dismiss(self.on_q)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="question")
            yield Label(self.hint, classes="hint")
            with Horizontal(classes="buttons"):
                for ident, label, variant in self.choices:
                    yield Button(label, variant=variant, id=ident, compact=True)

    def on_mount(self) -> None:
        self.query(Button).first().focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None if event.button.id == "cancel" else event.button.id)

    def action_cancel(self) -> None:
        self.dismiss(None)
