"""The footer, the help screen and keys remapped in config.toml, in the running app."""

from __future__ import annotations

from pathlib import Path

from tui.screens.help import HelpScreen

from tui_testing import make_app, running, wait_until


def footer_keys(app) -> str:
    return " ".join(str(k.render()) for k in app.screen.query("FooterKey"))


async def test_remapped_key_works_and_shows(glmchat_dirs: Path, checkpoints):
    config = glmchat_dirs / "config"
    config.mkdir()
    (config / "config.toml").write_text('[keys]\nnext_adapter = "f9"\nbogus = "x"\n', encoding="utf-8")
    app = make_app(["--adapter", str(checkpoints[0])])
    async with running(app) as pilot:
        assert any("unknown key action 'bogus'" in n.message for n in app._notifications)
        await pilot.press("ctrl+t")
        await pilot.pause()
        assert app.active_adapter is None, "the default key no longer switches"
        await pilot.press("f9")
        await wait_until(pilot, lambda: app.backend.active_adapter == "adgen/checkpoint-600")
        assert "f9" in footer_keys(app) and "^t" not in footer_keys(app)

        await pilot.press("f1")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))
        rows = {name: key for key, _what, name in app.screen.rows() if name}
        assert rows["next_adapter"] == "f9" and rows["regenerate"] == "^r" and rows["stop_training"] == "f8"
        assert str(config / "config.toml") in str(app.screen.query_one("#help-remap").render())
        await pilot.press("escape")
        await wait_until(pilot, lambda: app.screen is app.chat)


async def test_footer_shows_the_main_keys_and_stop_only_while_writing():
    app = make_app(token_delay=0.01)
    async with running(app) as pilot:
        await wait_until(pilot, lambda: footer_keys(app), what="the footer")
        keys = footer_keys(app)
        for label in ("Adapter", "Pick", "Compare", "Train", "Settings", "History", "Help"):
            assert label in keys
        assert "Stop" not in keys
        app.chat.prompt.value = "long"
        await pilot.press("enter")
        await wait_until(pilot, lambda: "Stop" in footer_keys(app), what="Esc Stop in the footer")
        await pilot.press("escape")
        await wait_until(pilot, lambda: "Stop" not in footer_keys(app))
