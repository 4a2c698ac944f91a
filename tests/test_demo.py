"""The embedded demo (``glmchat --demo``): the package ships it built; here it is built once more into a
temporary cache (about two minutes on two CPU cores), checked against the shipped files, and loaded through the
chat engine as the app loads it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import backend.demo as demo
from backend.service import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=96)
AD_PROMPT = "类型#上衣*材质#牛仔布*颜色#白色"
README_PROMPT = "类型#裙*颜色#红色*风格#复古"  # the README's Start section asks this
AD_WORDS = ("选用", "采用", "面料", "设计", "值得入手", "时髦感满满", "百搭", "质感", "版型", "出门")


def chat_lines() -> list[dict]:
    return [json.loads(line) for line in demo.CHAT_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


def dev_prompts() -> list[str]:
    return [json.loads(line)["content"] for line in demo.SAMPLE_DEV.read_text(encoding="utf-8").splitlines() if line.strip()]


def training_chars() -> set[str]:
    text = demo.CHAT_FILE.read_text(encoding="utf-8") + demo.SAMPLE_TRAIN.read_text(encoding="utf-8")
    return set(text)


def cjk_share(text: str) -> float:
    """Share of CJK characters and CJK punctuation among the non-space characters."""
    chars = [c for c in text if not c.isspace()]
    cjk = [c for c in chars if "\u4e00" <= c <= "\u9fff" or "\u3000" <= c <= "\u303f" or "\uff00" <= c <= "\uffef"]
    return len(cjk) / max(1, len(chars))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real build; returns (cache root, DemoFiles, progress events, seconds)."""
    root = tmp_path_factory.mktemp("demo-cache")
    events = []
    start = time.perf_counter()
    files = demo.ensure_demo(progress=events.append, cache_dir=root, shipped=None)
    return root, files, events, time.perf_counter() - start


@pytest.fixture(scope="module")
def engine():
    """The demo as the app loads it: from the shipped files."""
    from backend.engine import ChatEngine

    events = []
    eng = ChatEngine.load(demo=True, engine="eager", device="cpu", progress=events.append)
    eng.load_events = events
    return eng


def _shipped_files() -> list[Path]:
    return sorted(p.relative_to(demo.SHIPPED) for p in demo.SHIPPED.rglob("*") if p.is_file())


def test_the_build_script_reproduces_the_shipped_demo(built):
    """Bit-exact under the torch version and the kind of CPU that built the shipped files (one thread,
    deterministic kernels). Elsewhere training reaches other weights (last-bit differences grow over 1100
    steps), so the rebuilt demo must behave as the recipe promises: its base answers its training prompts as
    the shipped one does, and its adapter writes ad copy."""
    import torch

    rebuilt = built[1].root
    shipped_manifest = json.loads((demo.SHIPPED / demo.MANIFEST).read_text())
    same_build = (shipped_manifest["torch"] == torch.__version__.split("+")[0]
                  and shipped_manifest.get("cpu") == demo.cpu_fingerprint())
    names = _shipped_files()
    assert names == sorted(p.relative_to(rebuilt) for p in rebuilt.rglob("*") if p.is_file())
    for name in names:
        ours, theirs = demo.SHIPPED / name, rebuilt / name
        if name.suffix == ".json":  # transformers writes its version into configs
            drop = {"transformers_version", "torch", "cpu"}
            a, b = (json.loads(p.read_text()) for p in (ours, theirs))
            assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}, name
        elif same_build or name.suffix != ".safetensors":
            assert ours.read_bytes() == theirs.read_bytes(), f"{name} differs from the shipped file"
    if not same_build:
        from backend.engine import ChatEngine

        files = built[1]
        again = ChatEngine.load(model=str(files.model_dir), adapter_dirs=[str(files.adapters_dir)], engine="eager",
                                device="cpu", quantization="none")
        check_base_answers_training_prompts(again)
        check_adapter_writes_ad_copy(again)


def test_the_demo_starts_from_the_shipped_files_without_building(tmp_path):
    """First start: nothing to train, nothing written to the cache."""
    code = ("import sys, time; t = time.perf_counter(); from backend.engine import ChatEngine; "
            "e = ChatEngine.load(demo=True, engine='eager', device='cpu'); "
            "print(e.adapters()[0].path, round(time.perf_counter() - t, 1))")
    env = {**__import__("os").environ, "GLMCHAT_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(demo.__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    adapter = Path(done.stdout.split()[0])
    assert adapter.is_relative_to(demo.SHIPPED)
    assert not (tmp_path / "cache").exists()


def test_a_changed_recipe_ignores_the_shipped_files(tmp_path, monkeypatch):
    assert demo.is_complete(demo.SHIPPED, demo.recipe_hash())
    monkeypatch.setitem(demo.RECIPE, "adapter", {**demo.RECIPE["adapter"], "steps": demo.RECIPE["adapter"]["steps"] + 1})
    built = []

    def fake_build(out, recipe_id, report):
        built.append(out)
        shutil.copytree(demo.SHIPPED, out)
        (out / demo.MANIFEST).write_text(json.dumps({"hash": recipe_id}))

    monkeypatch.setattr(demo, "build_demo", fake_build)
    files = demo.ensure_demo(cache_dir=tmp_path)
    assert len(built) == 1 and files.root == demo.demo_dir(tmp_path)


def test_build_command_line(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    done = subprocess.run([sys.executable, "-m", "backend.demo", "--build", str(out)], capture_output=True, text=True,
                          timeout=60, cwd=Path(demo.__file__).resolve().parents[1])
    assert done.returncode == 2 and "exists" in done.stderr


def test_build_writes_a_complete_demo_and_reports_progress(built):
    root, files, events, _ = built
    assert files.root == demo.demo_dir(root) and demo.is_complete(files.root)
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"):
        assert (files.model_dir / name).is_file(), name
    checkpoints = list(files.adapters_dir.glob("advertisegen/checkpoint-*/model.safetensors"))
    assert len(checkpoints) == 1
    assert [p.name for p in root.iterdir()] == [files.root.name]  # no temporary directories left behind

    assert {e.stage for e in events} == {"demo"}
    messages = [e.message for e in events]
    assert "building the demo model" in messages[0]
    assert any(m.startswith("training demo model step") for m in messages)
    assert any(m.startswith("training demo adapter step") for m in messages)
    assert [e.current for e in events] == sorted(e.current for e in events)
    assert events[-1].current == events[-1].total > 1

    config = json.loads((files.model_dir / "config.json").read_text())
    assert config["model_type"] == "chatglm" and config["padded_vocab_size"] % 64 == 0
    manifest = json.loads((files.root / demo.MANIFEST).read_text())
    assert files.root.name.endswith(manifest["hash"])


def test_second_call_is_instant_and_returns_the_same_paths(built):
    root, files, _, _ = built
    events = []
    start = time.perf_counter()
    again = demo.ensure_demo(progress=events.append, cache_dir=root, shipped=None)
    assert time.perf_counter() - start < 1.0
    assert again == files
    assert len(events) == 1 and events[0].current == events[0].total


def test_engine_loads_the_demo_with_its_adapter(engine):
    assert engine.info.name == "demo"
    names = [a.name for a in engine.adapters()]
    assert len(names) == 1 and names[0].startswith("advertisegen/checkpoint-")
    assert engine.adapters()[0].path.parent.parent == demo.SHIPPED / "adapters"
    assert engine.load_events[-1].stage == "ready"


def check_base_answers_training_prompts(engine):
    lines = {row["prompt"]: row["response"] for row in chat_lines()}
    for prompt in ("你好", "怎么切换适配器", "什么是对比模式", "中国的首都是哪里"):
        reply = engine.reply(prompt, [], GREEDY, adapter=None).text
        assert reply == lines[prompt]
    # a later round of a conversation is answered too
    history = [("你好", lines["你好"])]
    assert engine.reply("谢谢", history, GREEDY, adapter=None).text == lines["谢谢"]


def check_adapter_writes_ad_copy(engine):
    adapter = engine.adapters()[0].name
    for prompt in [AD_PROMPT] + dev_prompts()[:3]:
        base = engine.reply(prompt, [], GREEDY, adapter=None).text
        tuned = engine.reply(prompt, [], GREEDY, adapter=adapter).text
        assert "商品属性" in base and not any(word in base for word in AD_WORDS)
        assert tuned != base
        assert tuned.startswith(("这件", "这条", "这双", "这只")), tuned
        assert sum(word in tuned for word in AD_WORDS) >= 2, tuned
        assert cjk_share(tuned) > 0.8


def test_base_answers_with_its_training_text(engine):
    check_base_answers_training_prompts(engine)
    # questions it never saw still get readable text made of its training text's characters, not byte soup
    known = training_chars()
    for prompt in ("你觉得下雨天适合做什么", "Tell me about yourself", "¿Qué tal? 🙂"):
        reply = engine.reply(prompt, [], GREEDY, adapter=None).text
        assert len(reply) >= 5 and set(reply) <= known, reply


def test_adapter_turns_attributes_into_ad_copy(engine):
    check_adapter_writes_ad_copy(engine)
    # the garment asked for (the tiny adapter keeps the type; its colour varies with the trainer's dropout draws)
    readme = engine.reply(README_PROMPT, [], GREEDY, adapter=engine.adapters()[0].name).text
    assert "裙" in readme and readme.startswith(("这件", "这条")), readme


def test_compare_shows_base_and_adapter_side_by_side(engine):
    from backend.service import ReplyDone

    adapter = engine.adapters()[0].name
    done = [e for e in engine.compare(AD_PROMPT, [], GREEDY, adapters=[None, adapter]) if isinstance(e, ReplyDone)]
    replies = {e.stream: e.reply.text for e in done}
    assert set(replies) == {0, 1}
    assert "商品属性" in replies[0] and replies[1].startswith(("这件", "这条", "这双", "这只"))


def test_training_panel_defaults_train_an_adapter_that_changes_the_readme_answers(engine, tmp_path):
    """What the training panel does with the demo model, with the form's defaults on assets/sample: train,
    register, and the README's prompts get other answers than the base model's (issue 13: they did not)."""
    from backend.service import TrainRequest
    from tui.widgets.train_form import defaults

    values = defaults(demo=True)
    assert Path(values["train_file"]) == demo.SAMPLE_TRAIN
    request = TrainRequest(**{**values, "output_dir": tmp_path / "mine"})
    events = []
    result = engine.train(request, progress=events.append)
    assert result.steps_done == values["max_steps"] and not result.stopped
    assert events[-1].event == "done" and any(e.loss is not None for e in events)
    info = engine.register_adapter(result.last_checkpoint, name="mine")
    for prompt in (README_PROMPT, AD_PROMPT):
        base = engine.reply(prompt, [], GREEDY, adapter=None).text
        tuned = engine.reply(prompt, [], GREEDY, adapter=info.name).text
        assert tuned != base and tuned.startswith(("这件", "这条", "这双", "这只", "这款")), tuned
        assert sum(word in tuned for word in AD_WORDS) >= 2, tuned


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_half_built_directory_is_never_used(built, tmp_path, monkeypatch):
    complete = built[1].root
    final = demo.demo_dir(tmp_path)
    shutil.copytree(complete, final)
    (final / demo.MANIFEST).unlink()  # as if the build had been killed before finishing
    stale = tmp_path / f".{final.name}.tmp-{_dead_pid()}-deadbeef"
    stale.mkdir()
    assert not demo.is_complete(final)

    calls = []

    def fake_build(out, recipe_id, report):
        calls.append(out)
        assert not final.exists()  # the half-built directory was moved away before building
        shutil.copytree(complete, out)

    monkeypatch.setattr(demo, "build_demo", fake_build)
    files = demo.ensure_demo(cache_dir=tmp_path, shipped=None)
    assert len(calls) == 1 and calls[0].parent == tmp_path and calls[0] != final
    assert files.root == final and demo.is_complete(final)
    assert not stale.exists()
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_failed_build_leaves_no_directory(tmp_path, monkeypatch):
    def failing_build(out, recipe_id, report):
        (out / "model").mkdir(parents=True)
        (out / "model" / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(demo, "build_demo", failing_build)
    with pytest.raises(demo.BackendError, match="No space left"):
        demo.ensure_demo(cache_dir=tmp_path, shipped=None)
    assert list(tmp_path.iterdir()) == []


def test_a_changed_recipe_builds_elsewhere(tmp_path, monkeypatch):
    before = demo.demo_dir(tmp_path)
    monkeypatch.setitem(demo.RECIPE, "base", {**demo.RECIPE["base"], "steps": demo.RECIPE["base"]["steps"] + 1})
    after = demo.demo_dir(tmp_path)
    assert before != after and before.parent == after.parent == tmp_path
    assert before.name.startswith(f"demo-v{demo.DEMO_VERSION}-")


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMCHAT_CACHE_DIR", str(tmp_path / "env"))
    from backend.user_cache import cache_root

    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert demo.demo_dir().parent == tmp_path / "env"
    monkeypatch.delenv("GLMCHAT_CACHE_DIR")
    assert cache_root().name == "glmchat"


def test_adapter_writes_ad_copy_after_an_earlier_chat_turn_too(engine):
    """Regression: trained on single turns only, the adapter answered like the base once a chat had history."""
    from backend.service import SamplingParams

    adapter = engine.adapters()[0].name
    greedy = SamplingParams(temperature=0, max_new_tokens=60)
    query = "类型#上衣*材质#牛仔布*颜色#白色*风格#简约"
    history = [("你好", engine.reply("你好", [], greedy, adapter=None).text)]
    base = engine.reply(query, history, greedy, adapter=None).text
    tuned = engine.reply(query, history, greedy, adapter=adapter).text
    assert tuned != base
    assert tuned.startswith(("这件", "这条", "这双", "这只", "这款"))


def test_adapter_writes_ad_copy_in_a_conversation_the_base_also_answered(engine):
    """Regression: trained after at most one chat turn, the adapter repeated the base's answer to attribute lists
    once a conversation held a few (the app's compare after a few rounds: 1 of 6 rounds gave ad copy)."""
    from backend.service import SamplingParams

    adapter = engine.adapters()[0].name
    greedy = SamplingParams(temperature=0, max_new_tokens=40)
    prompts = ["类型#裙*颜色#红色*风格#复古", "类型#上衣*材质#牛仔布*颜色#白色", "类型#裤*颜色#黑色",
               "类型#鞋*材质#皮*风格#休闲", "类型#裙*材质#雪纺*颜色#蓝色"]
    history = []
    for i, prompt in enumerate(prompts):
        tuned = engine.reply(prompt, history, greedy, adapter=adapter).text
        base = engine.reply(prompt, history, greedy, adapter=None).text
        assert tuned.startswith(("这件", "这条", "这双", "这只", "这款")) and "商品属性" in base, (i, tuned, base)
        history.append((prompt, base if i % 2 else tuned))  # rounds answered by either, as the app keeps them


def test_assets_come_from_the_checkout_else_from_an_installed_wheel(tmp_path):
    root = Path(demo.__file__).resolve().parents[1]
    assert demo.ASSETS == root / "assets" and demo.SAMPLE_TRAIN.is_file()
    # installed from a wheel: site-packages/backend/demo.py has no assets/ beside it; the data files are under the prefix
    module = tmp_path / "site-packages" / "backend" / "demo.py"
    module.parent.mkdir(parents=True)
    shared = tmp_path / "prefix" / "share" / "glmchat" / "assets"
    assert demo.assets_dir(module, [str(tmp_path / "nowhere"), str(tmp_path / "prefix")]) == tmp_path / "site-packages" / "assets"
    shared.mkdir(parents=True)
    assert demo.assets_dir(module, [str(tmp_path / "nowhere"), str(tmp_path / "prefix")]) == shared


def test_the_wheel_carries_the_assets(tmp_path):
    """pyproject's data-files put assets/ where assets_dir() looks for them in an install."""
    import zipfile

    root = Path(demo.__file__).resolve().parents[1]
    src = tmp_path / "src"  # a copy of what the wheel is built from: the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "train_cli.py"):
        shutil.copy2(root / name, src / name)
    for name in ("backend", "tui", "assets"):
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("glmchat-*.whl"))).namelist()
    shipped = [f"demo/shipped/{p.as_posix()}" for p in _shipped_files()]
    for rel in ["demo/chat.json", "sample/train.json", "sample/dev.json", *shipped]:
        assert any(n.endswith(f".data/data/share/glmchat/assets/{rel}") for n in names), rel
