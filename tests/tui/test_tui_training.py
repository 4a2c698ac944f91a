"""The training panel: an in-process run, stopping it, chat meanwhile, following progress.jsonl."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from textual.widgets import ProgressBar

from backend.service import TrainProgress
from tui.screens import training
from tui.screens.training import TrainingScreen, parse_progress_line

from tui_testing import make_app, replies, running, send, wait_until


@pytest.fixture
def train_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.json"
    path.write_text("\n".join(json.dumps({"content": f"类型#{i}", "summary": "好"}) for i in range(8)), encoding="utf-8")
    return path


async def open_panel(pilot) -> TrainingScreen:
    await pilot.press("f6")
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, TrainingScreen), what="the training panel")
    return pilot.app.screen


def fill(panel: TrainingScreen, **values) -> None:
    for name, value in values.items():
        panel.query_one(f"#train-{name}").value = str(value)


async def start_long_run(pilot, train_file: Path, out: Path) -> TrainingScreen:
    """A run far from its end (no checkpoint of its own soon), already a few steps in."""
    panel = await open_panel(pilot)
    fill(panel, train_file=train_file, output_dir=out, max_steps=100000, save_steps=50000)
    await pilot.click("#start-run")
    await wait_until(pilot, lambda: panel.monitor.step >= 10, what="a few steps")
    return panel


async def test_in_process_run_shows_progress_and_chats_with_a_checkpoint(train_file, tmp_path):
    app = make_app()
    async with running(app) as pilot:
        panel = await open_panel(pilot)
        out = tmp_path / "out"
        fill(panel, train_file=train_file, output_dir=out, max_steps=6, save_steps=3, logging_steps=1)
        await pilot.click("#start-run")
        monitor = panel.monitor
        await wait_until(pilot, lambda: monitor.finished == "done", what="the run to finish")
        request = app.backend.calls[-1][1][0]
        assert (request.train_file, request.max_steps, request.pre_seq_len, request.learning_rate) == (
            train_file, 6, 128, 2e-2)  # the seed's defaults where the form was left alone
        bar = monitor.query_one(ProgressBar)
        assert (bar.total, bar.progress) == (6, 6)
        assert [s for s, _ in monitor.losses] == [1, 2, 3, 4, 5, 6]
        assert monitor.checkpoints == [out / "checkpoint-3", out / "checkpoint-6"]
        assert "step 6/6" in str(monitor.query_one("#train-steps").render())
        stats = str(monitor.query_one("#train-stats").render())
        assert "loss 3.0769" in stats and "lr 0.00e+00" in stats and "samples/s 160.0" in stats and "GPU 3.2 GB" in stats
        assert "micro-batch 8,\u00a0MLP\u00a0recomputed" in stats  # what the run's start said about its micro-batches
        assert app.training_status == ""
        # the chat keeps its adapter after a run: the notice says how to chat with the new checkpoint
        assert any("checkpoint-6. Press Enter on it" in n.message for n in app._notifications)

        monitor.query_one("#checkpoints").focus()
        await pilot.press("enter")  # chat with the highlighted (latest) checkpoint
        await wait_until(pilot, lambda: app.screen is app.chat and app.active_adapter == "out/checkpoint-6",
                         what="the checkpoint to become the active adapter")
        await send(pilot, "hello")
        assert replies(app)[0].record.adapter == "out/checkpoint-6"


async def test_f7_starts_the_run_from_the_keyboard(train_file, tmp_path):
    app = make_app()
    async with running(app) as pilot:
        panel = await open_panel(pilot)
        fill(panel, train_file=train_file, output_dir=tmp_path / "out", max_steps=2, save_steps=2)
        await pilot.press("f7")
        await wait_until(pilot, lambda: panel.monitor.finished == "done", what="the run to finish")
        assert [c[1][0].max_steps for c in app.backend.calls if c[0] == "train"] == [2]


def test_demo_form_starts_from_the_demo_adapter_settings():
    from backend.demo import RECIPE
    from tui.widgets.train_form import defaults

    values = defaults(demo=True)
    spec = RECIPE["adapter"]
    assert (values["pre_seq_len"], values["max_steps"], values["learning_rate"]) == (spec["pre_seq_len"], spec["steps"], spec["learning_rate"])
    assert values["save_steps"] == values["max_steps"] and Path(values["train_file"]).is_file()
    assert defaults()["pre_seq_len"] == 128  # train.sh's otherwise


async def test_form_errors_block_the_start(tmp_path):
    app = make_app()
    async with running(app) as pilot:
        panel = await open_panel(pilot)
        fill(panel, train_file=tmp_path / "missing.json", max_steps="many")
        await pilot.click("#start-run")
        await pilot.pause()
        error = str(panel.query_one("#train-form-error").render())
        assert "Max steps: 'many' is not a whole number." in error and "missing.json does not exist" in error
        assert panel.mode is None and not [c for c in app.backend.calls if c[0] == "train"]


async def test_the_form_blends_several_train_files(train_file, tmp_path):
    from tui.widgets.train_form import TrainForm

    other = tmp_path / "chat.json"
    other.write_text(train_file.read_text(encoding="utf-8"), encoding="utf-8")
    app = make_app()
    async with running(app) as pilot:
        panel = await open_panel(pilot)
        form = panel.query_one(TrainForm)
        fill(panel, train_file=f"{train_file}, {other}", mix="0.7, 0.3")
        request, errors = form.request()
        assert errors == [] and request.train_file == [train_file, other] and request.mix == (0.7, 0.3)
        fill(panel, train_file=train_file, mix="")
        request, errors = form.request()
        assert errors == [] and request.train_file == train_file and request.mix is None
        fill(panel, mix="most, some")
        assert form.request()[1] == ["Mix weights: 'most, some' is not numbers separated by commas."]


async def test_stop_saves_a_checkpoint_and_chat_works_meanwhile(train_file, tmp_path):
    app = make_app(train_step_delay=0.005)
    async with running(app) as pilot:
        panel = await start_long_run(pilot, train_file, tmp_path / "out")
        await pilot.press("escape")  # back to the chat: training keeps going
        await wait_until(pilot, lambda: app.screen is app.chat)
        await send(pilot, "are you still there")
        assert replies(app)[0].record is not None and panel.mode == "train"
        assert app.training_status.startswith("training ")
        assert "training " in str(app.chat.query_one("#status").render())

        await pilot.press("f6")
        await wait_until(pilot, lambda: app.screen is panel)
        await pilot.press("f8")
        await wait_until(pilot, lambda: panel.mode is None, what="the run to stop")
        monitor = panel.monitor
        assert monitor.finished == "stopped" and len(monitor.checkpoints) == 1
        saved = monitor.checkpoints[0]
        assert saved.name == f"checkpoint-{monitor.step}" and (saved / "pytorch_model.bin").is_file()
        assert app.training_status == ""


async def test_follow_a_run_started_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "FOLLOW_POLL_S", 0.02)
    run = tmp_path / "elsewhere"
    run.mkdir()
    log = run / "progress.jsonl"

    def write(*events: TrainProgress, tail: str = "") -> None:
        with log.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(asdict(e)) + "\n" for e in events) + tail)

    write(TrainProgress(0, 30, event="start"),
          TrainProgress(10, 30, loss=2.5, learning_rate=0.02, elapsed_s=10.0, samples_per_s=16.0, gpu_mem_gb=7.1))
    app = make_app()
    async with running(app) as pilot:
        panel = await open_panel(pilot)
        await pilot.click("#--content-tab-follow")
        await wait_until(pilot, lambda: panel.query_one("#follow-run").region, what="the Follow tab")
        panel.query_one("#follow-dir").value = str(run)
        await pilot.click("#follow-run")
        monitor = panel.monitor
        await wait_until(pilot, lambda: monitor.step == 10, what="the first events")
        assert "ETA 0:00:20" in str(monitor.query_one("#train-steps").render())  # from elapsed / step
        assert app.training_status == "following 10/30"

        write(TrainProgress(20, 30, loss=2.0, elapsed_s=20.0, eta_s=10.0),
              TrainProgress(20, 30, event="eval", eval_metrics={"rouge-1": 31.12, "bleu-4": 8.1}),
              TrainProgress(20, 30, checkpoint=str(run / "checkpoint-20"), event="save"),
              tail='{"step": 25, "total_st')  # a line still being written
        await wait_until(pilot, lambda: monitor.checkpoints == [run / "checkpoint-20"], what="the checkpoint")
        assert monitor.step == 20 and monitor.losses == [(10, 2.5), (20, 2.0)]
        assert "rouge-1 31.12 · bleu-4 8.10" in str(monitor.query_one("#train-stats").render())

        write(tail='eps": 30, "loss": 1.5}\nnot json\n')
        write(TrainProgress(30, 30, event="done"))
        await wait_until(pilot, lambda: monitor.finished == "done" and panel.mode is None, what="the end of the run")
        assert monitor.losses[-1] == (25, 1.5)


def test_progress_lines_tolerate_foreign_fields_and_garbage():
    assert parse_progress_line('{"step": 3, "total_steps": 9, "loss": 1.0, "extra": 1}') == TrainProgress(3, 9, loss=1.0)
    assert parse_progress_line("[1, 2]") is None and parse_progress_line("{") is None
    assert parse_progress_line('{"loss": 1.0}') is None  # step and total_steps are required


async def test_quit_during_an_in_process_run_saves_a_checkpoint_first(train_file, tmp_path):
    app = make_app(train_step_delay=0.005)
    async with running(app) as pilot:
        out = tmp_path / "out"
        panel = await start_long_run(pilot, train_file, out)
        await pilot.press("ctrl+q")
        await pilot.pause()
        assert app.return_code is None and panel.mode == "train"
        assert any("quitting stops it after saving a checkpoint" in n.message for n in app._notifications)
        await pilot.press("ctrl+q")
        await wait_until(pilot, lambda: app.return_code is not None, what="the app to exit")
    saved = sorted(out.glob("checkpoint-*"))
    assert len(saved) == 1 and (saved[0] / "pytorch_model.bin").is_file()
    assert json.loads((out / "progress.jsonl").read_text().splitlines()[-1])["event"] == "stopped"


async def test_follow_field_starts_empty_with_an_example_and_enter_on_a_checkpoint_opens_the_chat(tmp_path, monkeypatch):
    """The field held a path that does not exist; Enter on a followed run's checkpoint chats with it."""
    monkeypatch.setattr(training, "FOLLOW_POLL_S", 0.02)
    run = tmp_path / "elsewhere"
    checkpoint = run / "checkpoint-20"
    checkpoint.mkdir(parents=True)
    (checkpoint / "pytorch_model.bin").write_bytes(b"weights")
    (checkpoint / "config.json").write_text(json.dumps({"pre_seq_len": 8}), encoding="utf-8")
    events = [TrainProgress(20, 20, checkpoint=str(checkpoint), event="save"), TrainProgress(20, 20, event="done")]
    (run / "progress.jsonl").write_text("".join(json.dumps(asdict(e)) + "\n" for e in events), encoding="utf-8")
    app = make_app()
    async with running(app) as pilot:
        panel = await open_panel(pilot)
        await pilot.click("#--content-tab-follow")
        field = panel.query_one("#follow-dir")
        assert field.value == "" and field.placeholder.startswith("e.g. ")
        field.value = str(run)
        await pilot.click("#follow-run")
        await wait_until(pilot, lambda: panel.mode is None and panel.monitor.checkpoints == [checkpoint], what="the run")
        panel.query_one("#checkpoints").focus()
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.screen is app.chat and app.active_adapter == "elsewhere/checkpoint-20",
                         what="the chat with the checkpoint")


async def test_a_failed_run_names_the_form_fields_and_shows_the_whole_sentence(train_file, tmp_path):
    from backend.training import check_request

    out = tmp_path / "out"
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoint-5" / "pytorch_model.bin").write_bytes(b"weights")
    app = make_app()
    async with running(app, size=(80, 24)) as pilot:
        app.backend.train = lambda request, progress, cancel=None: check_request(request)  # the real refusal
        panel = await open_panel(pilot)
        fill(panel, train_file=train_file, output_dir=out)
        await pilot.click("#start-run")
        await wait_until(pilot, lambda: panel.mode is None and panel.monitor.finished not in (None, "done"), what="the failure")
        await pilot.pause()
        error = panel.monitor.query_one("#train-error")
        text = str(error.render())
        assert "--" not in text and "set “Resume from”" in text and "“Overwrite output” to start over" in text, text
        # wrapped over lines, not cut at the screen's edge
        shown = "".join(line.text.rstrip() for line in error.render_lines(error.region.reset_offset))
        assert shown.replace(" ", "").endswith("another“Outputdir”.") and error.size.height > 1, shown


def test_request_errors_name_the_forms_fields():
    from backend.training.requests import RequestError
    from tui.errors import explain

    err = RequestError("`pre_seq_len` must be at least 1 (got 0); or start over with `overwrite_output_dir`.")
    assert str(explain(err)) == "“Pre seq len” must be at least 1 (got 0); or start over with “Overwrite output”."
