"""At 80x24 the footer shows every key whole and the training form's fields show their values whole."""

from __future__ import annotations

from textual.widgets import Input, Label

from tui.screens.settings import SettingsScreen
from tui.screens.training import TrainingScreen

from tui_testing import make_app, running, wait_until

SIZE = (80, 24)


def footer_entries(screen) -> list[tuple[str, int]]:
    """(text, right edge) of each key shown in the footer, checking that none covers the next one."""
    keys = sorted((k for k in screen.query("FooterKey") if k.display), key=lambda k: k.region.x)
    for left, right in zip(keys, keys[1:]):
        assert left.region.right <= right.region.x, f"{left.render()} is cut by {right.render()}"
    return [(str(k.render()).strip(), k.region.right) for k in keys]


async def test_chat_footer_fits_80_columns():
    app = make_app()
    async with running(app, size=SIZE) as pilot:
        await wait_until(pilot, lambda: footer_entries(app.screen), what="the footer")
        entries = footer_entries(app.screen)
        assert all(right <= SIZE[0] for _text, right in entries), entries
        shown = " ".join(text for text, _right in entries)
        for label in ("^t Adapter", "f4 Pick", "f5 Compare", "f6 Train", "f2 Settings", "f3 History", "f1 Help"):
            assert label in shown, shown


async def test_training_form_fields_are_readable_at_80_columns():
    app = make_app()
    async with running(app, size=SIZE) as pilot:
        await pilot.press("f6")
        await wait_until(pilot, lambda: isinstance(app.screen, TrainingScreen))
        form = app.screen.query_one("#train-form")  # the New run tab opens first
        await wait_until(pilot, lambda: form.region.width > 0, what="the form")
        await pilot.pause()
        for field in form.query(Input):
            assert field.region.width >= max(len(field.value), 8) + 1, (field.id, field.value, field.region.width)
        for label in form.query(Label):
            assert label.region.width >= len(str(label.render())), str(label.render())
        entries = footer_entries(app.screen)
        assert all(right <= SIZE[0] for _text, right in entries), entries


async def test_settings_dialog_buttons_show_at_80x24():
    app = make_app()
    async with running(app, size=SIZE) as pilot:
        await pilot.press("f2")
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen))
        await pilot.pause()
        box = app.screen.query_one("#settings-box").region
        for button in ("#save", "#cancel"):
            region = app.screen.query_one(button).region
            assert region.height and region.bottom <= box.bottom - 1, (button, region, box)  # inside the border
