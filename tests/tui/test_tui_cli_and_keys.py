"""Command line parsing and the [keys] table of config.toml."""

from __future__ import annotations

import pytest

from tui import keys
from tui.__main__ import main, parse_args


def test_flags_and_original_spellings():
    args = parse_args(["--model", "m", "--quantization", "4bit", "--adapter", "a", "--adapter", "b",
                       "--adapters", "runs", "--top_p", "0.5", "--max_new_tokens", "9", "--temperature", "0"])
    assert (args.model, args.quantization, args.adapter, args.adapters) == ("m", "4bit", ["a", "b"], ["runs"])
    assert (args.top_p, args.max_new_tokens, args.temperature) == (0.5, 9, 0.0)
    assert parse_args(["--top-p", "0.7"]).top_p == 0.7


@pytest.mark.parametrize("argv, reason", [
    (["--quantization", "3bit"], "invalid choice"),
    (["--top-p", "1.5"], "--top-p must be above 0 and at most 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
])
def test_bad_flags_exit_2_with_one_line(argv, reason, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert reason in err and err.count("\n") == 1


def test_prompt_mode_goes_to_backend_cli(monkeypatch):
    import sys
    import types

    seen = {}
    module = types.ModuleType("backend.cli")
    module.run_once = lambda args: seen.setdefault("prompt", args.prompt) and 0
    monkeypatch.setitem(sys.modules, "backend.cli", module)
    assert main(["--prompt", "你好"]) == 0
    assert seen == {"prompt": "你好"}


def test_help_does_not_mention_the_fake_backend(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--adapter" in out and "FAKE" not in out.upper()


def test_keys_config_remaps_and_warns(tmp_path):
    (tmp_path / "config.toml").write_text(
        '[keys]\nnext_adapter = "F9"\nregenerate = ["ctrl+r", "f10"]\nnope = "x"\ncopy_reply = 3\n', encoding="utf-8"
    )
    config = keys.load_key_config(tmp_path)
    assert config.keymap == {"glmchat.next_adapter": "f9", "glmchat.regenerate": "ctrl+r,f10"}
    assert any("unknown key action 'nope'" in w for w in config.warnings)
    assert any("copy_reply must be a key" in w for w in config.warnings)


def test_keys_config_clash_and_broken_file(tmp_path):
    (tmp_path / "config.toml").write_text('[keys]\nnext_adapter = "ctrl+r"\n', encoding="utf-8")
    assert any("'ctrl+r' is bound to both" in w for w in keys.load_key_config(tmp_path).warnings)
    (tmp_path / "config.toml").write_text("[keys\n", encoding="utf-8")
    config = keys.load_key_config(tmp_path)
    assert config.keymap == {} and "could not be read" in config.warnings[0]


def test_every_action_has_a_unique_name_and_a_handler():
    from tui.app import GLMChatApp
    from tui.screens.chat import ChatScreen
    from tui.screens.conversations import ConversationsScreen
    from tui.screens.training import TrainingScreen
    from tui.widgets.prompt import PromptInput

    owners = {"app": GLMChatApp, "chat": ChatScreen, "prompt": PromptInput, "training": TrainingScreen,
              "conversations": ConversationsScreen}
    names = [a.name for a in keys.ACTIONS]
    assert len(names) == len(set(names))
    for action in keys.ACTIONS:
        owner = GLMChatApp if action.action.startswith("app.") else owners[action.scope]
        assert hasattr(owner, f"action_{action.action.removeprefix('app.')}"), action
