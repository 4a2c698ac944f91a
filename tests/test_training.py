"""P-Tuning v2 training on a tiny ChatGLM2: the loss falls, resume continues the same curve, saves are atomic,
checkpoints load the way users load them, progress events carry their fields, the shared base is untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from backend.adapters import AdapterRegistry, read_prefix_checkpoint
from backend.loading import load_model
from backend.progress import read_progress
from backend.service import BackendError, TrainProgress, TrainRequest
from backend.training import PREFIX_KEY, AdamWHF, PrefixStep, StepPlan, list_checkpoints, resolve_resume, train_prefix
from helpers_tiny import make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TRAIN = ROOT / "assets" / "sample" / "train.json"
SHARED_GOLDEN = ROOT.parent / "shared" / "reference" / "golden" / "tiny"

# ------------------------------------------------------------------------------------ shared helpers


def sharpened_tiny_model_dir(path: Path, factor: float = 5.0) -> Path:
    """A tiny model whose weights are ``factor`` x the factory's (std 0.1 instead of 0.02): with the
    factory's near-uniform outputs a prefix can barely move the loss, so 'the loss falls' says little."""
    make_tiny_model_dir(path)
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    state = {k: (v if "layernorm" in k else v * factor).contiguous() for k, v in state.items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    return path


_FALLBACK = [
    ("类型#上衣*材质#牛仔布*颜色#白色*风格#简约", "这件白色牛仔上衣简约大方，搭配什么都好看。"),
    ("类型#裙*颜色#红色*风格#复古", "红色的复古长裙，走起路来非常优雅。"),
    ("类型#裤*材质#棉*风格#休闲", "休闲棉裤柔软舒适，日常穿着很轻松。"),
    ("类型#鞋*颜色#黑色*风格#通勤", "黑色通勤鞋低调耐看，久走不累脚。"),
]


def data_lines(n: int, start: int = 0) -> list[dict]:
    """``n`` AdvertiseGen-style records: the project's sample data when present, else made here."""
    if SAMPLE_TRAIN.is_file():
        records = [json.loads(line) for line in SAMPLE_TRAIN.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        records = [{"content": c + f"*编号#{i}", "summary": s} for i in range(40) for c, s in _FALLBACK]
    return [records[(start + i) % len(records)] for i in range(n)]


def write_data(path: Path, n: int, start: int = 0) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data_lines(n, start)), encoding="utf-8")
    return path


def request(tmp_path: Path, train_file: Path = None, **kw) -> TrainRequest:
    values = dict(
        train_file=train_file, output_dir=tmp_path / "out", pre_seq_len=8, max_source_length=24, max_target_length=24,
        learning_rate=5e-2, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=6,
        logging_steps=1, save_steps=3, seed=7,
    )
    values.update(kw)
    return TrainRequest(**values)


def losses(events) -> list[float]:
    return [e.loss for e in events if e.event == "log"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return sharpened_tiny_model_dir(tmp_path_factory.mktemp("tiny_train") / "model")


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_model(tiny_dir, quantization="none", device="cpu")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    return write_data(tmp_path_factory.mktemp("data") / "train.json", 24)


# ------------------------------------------------------------------------------------ the recipe


def test_loss_falls_steadily_over_30_steps(loaded, tmp_path):
    data = write_data(tmp_path / "train.json", 48)
    events = []
    req = request(tmp_path, data, pre_seq_len=16, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                  max_steps=30, save_steps=0, max_source_length=32, max_target_length=32)
    result = train_prefix(loaded.model, loaded.tokenizer, req, progress=events.append)
    curve = losses(events)
    assert len(curve) == 30 and result.steps_done == 30 and not result.stopped
    windows = [sum(curve[i:i + 10]) / 10 for i in (0, 10, 20)]
    assert windows[0] > windows[1] > windows[2], windows
    assert sum(curve[:5]) / 5 - sum(curve[-5:]) / 5 > 0.3, curve
    assert result.checkpoints == [tmp_path / "out" / "checkpoint-30"]


def test_base_model_is_not_modified(loaded, train_file, tmp_path):
    model = loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flag = model.transformer.encoder.gradient_checkpointing
    train_prefix(model, loaded.tokenizer, request(tmp_path, train_file, max_steps=2, gradient_checkpointing=True))
    assert not model.training and model.transformer.prefix_encoder is None
    assert model.transformer.encoder.gradient_checkpointing == flag
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_gradient_checkpointing_gives_the_same_losses(loaded, train_file, tmp_path):
    plain, ckpt = [], []
    train_prefix(loaded.model, loaded.tokenizer, request(tmp_path / "a", train_file, max_steps=3), progress=plain.append)
    train_prefix(loaded.model, loaded.tokenizer, request(tmp_path / "b", train_file, max_steps=3, gradient_checkpointing=True),
                 progress=ckpt.append)
    assert losses(plain) == pytest.approx(losses(ckpt), rel=1e-5)


def test_optimizer_and_schedule_are_the_trainer_defaults(loaded):
    from backend.training import new_prefix_encoder

    encoder = new_prefix_encoder(loaded.model.config, 4, False, torch.device("cpu"), seed=0)
    step = PrefixStep(loaded.model, encoder, 2e-2, total_steps=3000)
    group = step.optimizer.param_groups[0]
    assert type(step.optimizer) is AdamWHF  # the original's transformers 4.30 AdamW
    assert type(PrefixStep(loaded.model, encoder, 2e-2, 10, optim="adamw_torch").optimizer) is torch.optim.AdamW
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.999), 1e-8, 0.0)
    assert encoder.embedding.weight.dtype == torch.float32
    assert 0.9 < encoder.embedding.weight.std().item() < 1.1  # torch's default N(0, 1), as the original leaves it
    lrs = []
    for _ in range(3):
        encoder.embedding.weight.grad = torch.zeros_like(encoder.embedding.weight)
        step.step()
        lrs.append(step.learning_rate)
    assert lrs == pytest.approx([2e-2 * (3000 - s) / 3000 for s in (1, 2, 3)])


def test_golden_prefix_loss_matches_the_original(tmp_path):
    """The original code's float32 training loss of the golden tiny model with its P-Tuning prefix."""
    if not SHARED_GOLDEN.is_dir():
        pytest.skip(f"reference material not found at {SHARED_GOLDEN} (../shared is absent)")
    from backend.adapters import build_prefix_encoder
    from backend.configuration import ChatGLMConfig
    from backend.modeling import ChatGLMForConditionalGeneration

    expected = json.loads((SHARED_GOLDEN / "expected.json").read_text())
    config = ChatGLMConfig.from_pretrained(str(SHARED_GOLDEN))
    model = ChatGLMForConditionalGeneration(config).eval()
    state = {k: v.float() for k, v in load_file(str(SHARED_GOLDEN / "model.safetensors")).items() if "inv_freq" not in k}
    model.load_state_dict(state, strict=False)
    encoder = build_prefix_encoder(read_prefix_checkpoint(SHARED_GOLDEN / "prefix"), config, torch.device("cpu"))
    step = PrefixStep(model, encoder, 2e-2, total_steps=1)
    batch = {"input_ids": torch.tensor([expected["train_input_ids"]]), "labels": torch.tensor([expected["train_labels"]])}
    with torch.no_grad():
        loss = step.loss(batch)  # no dropout: the original was in eval mode for this number
    assert loss.item() == pytest.approx(expected["train_loss_prefix"], abs=1e-4)


def test_trailing_padding_is_cut_without_changing_the_loss(loaded, tmp_path):
    from backend.data import collate_train, preprocess_train, read_examples
    from backend.training import new_prefix_encoder

    short = tmp_path / "short.json"
    short.write_text("".join(json.dumps({"content": c, "summary": s[:4 + i]}, ensure_ascii=False) + "\n"
                             for i, (c, s) in enumerate(_FALLBACK)), encoding="utf-8")
    features = preprocess_train(list(read_examples(short, "content", "summary")), loaded.tokenizer, 24, 40)
    plan = StepPlan(features, 2, 1, seed=0)
    cut = plan.micro_batches(0, 2)[0].batch
    full = collate_train([features[i] for i in plan.group(0)])
    assert cut["input_ids"].shape[1] < full["input_ids"].shape[1] == 65  # the original pads every row to 24 + 40 + 1
    assert (full["labels"][:, cut["labels"].shape[1]:] == -100).all()
    encoder = new_prefix_encoder(loaded.model.config, 4, False, torch.device("cpu"), seed=0)
    step = PrefixStep(loaded.model, encoder, 2e-2, total_steps=1)
    with torch.no_grad():
        assert step.loss(cut, [3, 4]).item() == pytest.approx(step.loss(full, [3, 4]).item(), abs=1e-5)


def test_epochs_set_the_step_count(loaded, train_file, tmp_path):
    # 24 examples, batch 2, accumulation 2: 6 steps per epoch.
    result = train_prefix(loaded.model, loaded.tokenizer,
                          request(tmp_path, train_file, max_steps=-1, num_train_epochs=1.5, save_steps=0))
    assert result.steps_done == 9
    state = json.loads((result.last_checkpoint / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(1.5)


# ------------------------------------------------------------------------------------ checkpoints and resume


def test_resume_continues_the_same_loss_curve(loaded, train_file, tmp_path):
    straight = []
    train_prefix(loaded.model, loaded.tokenizer, request(tmp_path / "straight", train_file), progress=straight.append)

    cancel, first = threading.Event(), []

    def stop_after_3(event):
        first.append(event)
        if event.event == "log" and event.step == 3:
            cancel.set()

    req = request(tmp_path / "split", train_file, save_steps=100)
    stopped = train_prefix(loaded.model, loaded.tokenizer, req, progress=stop_after_3, cancel=cancel)
    assert stopped.stopped and stopped.steps_done == 3
    assert stopped.last_checkpoint == tmp_path / "split" / "out" / "checkpoint-3"  # cancel saved one
    assert first[-1].event == "stopped"

    second = []
    resumed = train_prefix(loaded.model, loaded.tokenizer, request(tmp_path / "split", train_file, save_steps=100, resume="latest"),
                           progress=second.append)
    assert not resumed.stopped and resumed.steps_done == 6
    assert second[0].event == "start" and second[0].step == 3
    assert losses(first) + losses(second) == pytest.approx(losses(straight), rel=1e-6, abs=1e-7)
    a = torch.load(tmp_path / "straight" / "out" / "checkpoint-6" / "pytorch_model.bin")
    b = torch.load(tmp_path / "split" / "out" / "checkpoint-6" / "pytorch_model.bin")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # progress.jsonl tells one continuous story: steps 0..6, one "done"
    steps = [e.step for e in read_progress(tmp_path / "split" / "out") if e.event == "log"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_checkpoint_layout_loads_with_the_seed_snippet_and_the_registry(loaded, tiny_dir, train_file, tmp_path):
    from transformers import AutoConfig, AutoModel

    result = train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, max_steps=3))
    ckpt = result.last_checkpoint
    assert ckpt.name == "checkpoint-3"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        ["pytorch_model.bin", "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"])
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    assert list(state) == ["transformer.prefix_encoder.embedding.weight"]
    assert state["transformer.prefix_encoder.embedding.weight"].dtype == torch.float32
    config = json.loads((ckpt / "config.json").read_text())
    assert config["pre_seq_len"] == 8 and config["prefix_projection"] is False
    assert config["model_type"] == "chatglm" and config["num_layers"] == loaded.model.config.num_layers

    # The seed's snippet, word for word apart from the paths.
    config = AutoConfig.from_pretrained(str(tiny_dir), trust_remote_code=True, pre_seq_len=8)
    model = AutoModel.from_pretrained(str(tiny_dir), config=config, trust_remote_code=True)
    prefix_state_dict = torch.load(os.path.join(ckpt, "pytorch_model.bin"))
    new_prefix_state_dict = {}
    for k, v in prefix_state_dict.items():
        if k.startswith("transformer.prefix_encoder."):
            new_prefix_state_dict[k[len("transformer.prefix_encoder."):]] = v
    model.transformer.prefix_encoder.load_state_dict(new_prefix_state_dict)
    model.eval()

    registry = AdapterRegistry(loaded.model.config, loaded.device, loaded.dtype)
    name = registry.register(ckpt).name
    ids = loaded.tokenizer.encode(loaded.tokenizer.build_prompt("类型#上衣*颜色#白色"))
    ids = torch.tensor([ids])
    with torch.no_grad():
        snippet = model(ids, use_cache=False).logits
        via_registry = loaded.model(ids, prefix_kv=registry.prefix_kv(name), use_cache=False).logits
        base = loaded.model(ids, use_cache=False).logits
    assert torch.allclose(snippet, via_registry, atol=1e-5)
    assert (via_registry - base).abs().max() > 1e-2


def test_prefix_projection_checkpoint_round_trips(loaded, train_file, tmp_path):
    result = train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, max_steps=2, prefix_projection=True))
    keys = torch.load(result.last_checkpoint / "pytorch_model.bin", weights_only=True).keys()
    assert {k[len(PREFIX_KEY):] for k in keys} == {"embedding.weight", "trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias"}
    ckpt = read_prefix_checkpoint(result.last_checkpoint)
    assert ckpt.prefix_projection and ckpt.pre_seq_len == 8


def test_a_failed_save_leaves_the_previous_checkpoint_intact(loaded, train_file, tmp_path, monkeypatch):
    import backend.training.checkpoints as training

    real = training.write_json
    calls = []

    def write_then_fail(path, data):  # the second checkpoint dies at its last file, after the weights
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(training, "write_json", write_then_fail)
    with pytest.raises(BackendError, match=r"disk holding .*out is full .* saving checkpoint-6; free at least \d+ MB.*checkpoint-3 is intact"):
        train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file))
    out = tmp_path / "out"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the temporary directory is gone
    registry = AdapterRegistry(loaded.model.config, loaded.device, loaded.dtype)
    assert registry.register(out / "checkpoint-3").pre_seq_len == 8

    monkeypatch.setattr(training, "write_json", real)
    result = train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, resume="latest"))
    assert result.steps_done == 6


def test_torch_save_on_a_full_disk_is_one_sentence(loaded, train_file, tmp_path, monkeypatch):
    """torch.save's zip writer reports a full disk as a RuntimeError, not an OSError (issue 13, item 3)."""
    real, calls = torch.save, []

    def save_then_fail(obj, path, *args, **kwargs):
        calls.append(path)
        if "checkpoint-6" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(BackendError) as err:
        train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file))
    message = str(err.value)
    assert "\n" not in message and f"{tmp_path / 'out'} is full" in message and "checkpoint-3 is intact" in message
    assert "free at least" in message
    out = tmp_path / "out"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert read_prefix_checkpoint(out / "checkpoint-3").pre_seq_len == 8


def test_resume_on_a_full_disk_is_one_sentence(loaded, train_file, tmp_path, monkeypatch):
    import backend.progress as progress

    train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, max_steps=3))

    def full(path, text):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(progress, "atomic_write_text", full)
    with pytest.raises(BackendError, match=r"is full .* rewriting progress.jsonl.*checkpoint-3 is intact"):
        train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, resume="latest"))
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-3"]


def test_a_crash_between_the_renames_of_a_resave_resumes_the_checkpoint_it_names(loaded, train_file, tmp_path):
    """Issue 13, item 6a: the checkpoint named before training is the one resumed."""
    train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, max_steps=6, save_steps=3))
    out = tmp_path / "out"
    os.replace(out / "checkpoint-6", out / ".old-checkpoint-6-4242")  # the first rename of a re-save of step 6
    req = request(tmp_path, train_file, max_steps=8, save_steps=3, resume="latest")
    from backend.training import CheckpointStore

    CheckpointStore(out).recover()
    assert resolve_resume(req).name == "checkpoint-6"
    events = []
    train_prefix(loaded.model, loaded.tokenizer, req, progress=events.append)
    assert events[0].event == "start" and events[0].step == 6


def test_a_save_killed_midway_is_ignored_and_cleaned(loaded, train_file, tmp_path):
    train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, max_steps=3))
    out = tmp_path / "out"
    # What a SIGKILL during the next save leaves: a hidden, half-written directory.
    junk = out / ".tmp-checkpoint-6-abc123"
    junk.mkdir()
    (junk / "pytorch_model.bin").write_bytes(b"PK\x03\x04 half a zip")
    # ... and a checkpoint caught between the two renames of a same-step swap.
    os.replace(out / "checkpoint-3", out / ".old-checkpoint-3-999")
    result = train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, resume="latest"))
    assert result.steps_done == 6
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-3", "checkpoint-6"]


def test_resume_refuses_a_checkpoint_of_another_shape(loaded, train_file, tmp_path):
    train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, max_steps=3))
    with pytest.raises(BackendError, match="pre_seq_len 8.*`pre_seq_len` 8"):
        train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, resume="latest", pre_seq_len=4))
    assert resolve_resume(request(tmp_path, train_file, resume=str(tmp_path / "out" / "checkpoint-3"))).name == "checkpoint-3"


def test_overwrite_output_dir_replaces_the_old_run(loaded, train_file, tmp_path):
    train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, max_steps=4, save_steps=2))
    with pytest.raises(BackendError, match="already holds checkpoints"):
        train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, max_steps=3))
    result = train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, max_steps=3, overwrite_output_dir=True))
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-3"] == [p.name for p in result.checkpoints]


# ------------------------------------------------------------------------------------ progress


def test_progress_events_and_jsonl_carry_every_field(loaded, train_file, tmp_path):
    events = []
    train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, max_steps=4, logging_steps=2, save_steps=2),
                 progress=events.append)
    lines = (tmp_path / "out" / "progress.jsonl").read_text().splitlines()
    names = {f.name for f in fields(TrainProgress)}
    assert all(set(json.loads(line)) == names for line in lines)
    assert read_progress(tmp_path / "out") == events
    assert [(e.event, e.step) for e in events] == [
        ("start", 0), ("log", 2), ("save", 2), ("log", 4), ("save", 4), ("done", 4)]
    log = events[1]
    assert log.total_steps == 4 and log.loss > 0 and log.learning_rate == pytest.approx(5e-2 * 2 / 4)
    assert log.epoch == pytest.approx(2 * 2 / 12, abs=1e-4) and log.elapsed_s > 0 and log.eta_s is not None
    assert log.samples_per_s > 0 and log.tokens_per_s > log.samples_per_s and log.gpu_mem_gb is None
    assert events[2].checkpoint.endswith("checkpoint-2")
    # the start says how the step goes through the model: the run's micro-batch and MLP recompute, in the log too
    start = events[0]
    assert (start.micro_batch_size, start.recompute_mlp) == (4, False)  # 2 x 2 a step, all at once on the CPU
    from backend.progress import format_event

    assert format_event(start) == "step 0/4  4 examples through the model at once, MLP activations kept"


def test_eval_during_training_reports_metrics(loaded, train_file, tmp_path):
    val = write_data(tmp_path / "dev.json", 3, start=30)
    events = []
    train_prefix(loaded.model, loaded.tokenizer,
                 request(tmp_path, train_file, validation_file=val, max_steps=2, eval_steps=2, max_target_length=8),
                 progress=events.append)
    evals = [e for e in events if e.event == "eval"]
    assert len(evals) == 1 and set(evals[0].eval_metrics) == {"rouge-1", "rouge-2", "rouge-l", "bleu-4"}
    assert (tmp_path / "out" / "generated_predictions.txt").read_text().count("\n") == 3
    kept = tmp_path / "out" / "eval" / "step-2"  # each evaluation's files stay beside the latest
    assert (kept / "generated_predictions.txt").read_text() == (tmp_path / "out" / "generated_predictions.txt").read_text()
    assert json.loads((kept / "metrics.json").read_text())["step"] == 2
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    assert any("eval_bleu-4" in row for row in state["log_history"])


# ------------------------------------------------------------------------------------ precision, errors, bench


def test_8bit_base_trains_without_nan(tiny_dir, train_file, tmp_path):
    q = load_model(tiny_dir, quantization="8bit", device="cpu")
    events = []
    train_prefix(q.model, q.tokenizer, request(tmp_path, train_file, max_steps=2, save_steps=0), progress=events.append)
    assert all(torch.isfinite(torch.tensor(x)) for x in losses(events)) and len(losses(events)) == 2
    weights = torch.load(tmp_path / "out" / "checkpoint-2" / "pytorch_model.bin", weights_only=True)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_out_of_memory_is_one_sentence_with_the_flags_that_help(loaded, train_file, tmp_path, monkeypatch):
    train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, max_steps=3))

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(PrefixStep, "backward", oom)
    with pytest.raises(BackendError) as err:
        train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, resume="latest"))
    message = str(err.value)
    assert "out of memory at step 4" in message and "4bit" in message and "--gradient-checkpointing" in message
    assert "\n" not in message
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-3"]


def test_a_non_finite_loss_stops_before_the_update(loaded, train_file, tmp_path, monkeypatch):
    train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, max_steps=3))
    before = torch.load(tmp_path / "out" / "checkpoint-3" / "pytorch_model.bin")
    monkeypatch.setattr(PrefixStep, "backward", lambda self, *a, **k: float("nan"))
    with pytest.raises(BackendError, match="the loss became nan at step 4.*lower --learning-rate"):
        train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, resume="latest"))
    after = torch.load(tmp_path / "out" / "checkpoint-3" / "pytorch_model.bin")
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-3"]
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(pre_seq_len=0), "`pre_seq_len` must be at least 1"),
        (dict(train_file=Path("/nonexistent/train.json")), "no such file"),
        (dict(max_steps=0), "`max_steps` or `num_train_epochs`"),
        (dict(eval_steps=5), "needs `validation_file`"),
        (dict(resume="/nonexistent/checkpoint-9"), "no checkpoint directory"),
    ],
)
def test_bad_requests_are_refused_before_any_work(loaded, train_file, tmp_path, change, match):
    with pytest.raises(BackendError, match=match):
        train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, **{"train_file": train_file, **change}))
    assert not (tmp_path / "out").exists()


def test_benchmark_step_times_a_training_step(loaded):
    sys.path.insert(0, str(ROOT / "bench"))
    from step_timer import benchmark_step

    result = benchmark_step(loaded.model, batch_size=1, seq_len=16, pre_seq_len=4, steps=2, warmup=1)
    assert result.ms_per_step > 0 and result.peak_gpu_gb is None
    ms, gb = result  # a plain tuple for bench scripts
    assert not loaded.model.transformer.encoder.gradient_checkpointing


# ------------------------------------------------------------------------------------ data parallel


@pytest.mark.timeout(120)
def test_two_processes_train_like_one(tiny_dir, train_file, tmp_path):
    """torchrun with 2 CPU processes (gloo): the same global batch, so the same loss curve; rank 0 alone writes."""
    common = ["--model", str(tiny_dir), "--train-file", str(train_file), "--pre-seq-len", "4", "--max-source-length", "16",
              "--max-target-length", "16", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "2",
              "--max-steps", "3", "--logging-steps", "1", "--save-steps", "3", "--learning-rate", "5e-2",
              "--quantization", "none", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one = subprocess.run([sys.executable, str(ROOT / "train_cli.py"), "train", *common, "--output-dir", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=100)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(ROOT / "train_cli.py"), "train", *common, "--output-dir", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=100)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "over 2 processes" in two.stderr and two.stderr.count("done: 3 steps") == 1
    a, b = read_progress(tmp_path / "one"), read_progress(tmp_path / "two")
    assert [e.event for e in a] == [e.event for e in b]  # one writer: no duplicated lines
    assert losses(b) == pytest.approx(losses(a), rel=1e-4)
    assert all(e.samples_per_s for e in b if e.event == "log")
    w1 = torch.load(tmp_path / "one" / "checkpoint-3" / "pytorch_model.bin")
    w2 = torch.load(tmp_path / "two" / "checkpoint-3" / "pytorch_model.bin")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
    assert json.loads((tmp_path / "two" / "checkpoint-3" / "trainer_state.json").read_text())["world_size"] == 2


def test_mlp_recomputation_changes_nothing_but_memory(loaded, train_file, tmp_path):
    """--no-recompute-mlp keeps the up-projections instead; the loss curve and the prefix are the same."""
    runs = {}
    for recompute in (True, False):
        events = []
        train_prefix(loaded.model, loaded.tokenizer, request(tmp_path / str(recompute), train_file, recompute_mlp=recompute),
                     progress=events.append)
        runs[recompute] = (losses(events), torch.load(tmp_path / str(recompute) / "out" / "checkpoint-6" / "pytorch_model.bin"))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6, abs=1e-7)
    assert all(torch.allclose(runs[True][1][k], runs[False][1][k], atol=1e-6) for k in runs[True][1])
    assert loaded.model.transformer.encoder.recompute_mlp is False  # the shared base is left as it was


def test_overwrite_replaces_the_old_runs_kept_evaluations(loaded, train_file, tmp_path):
    val = write_data(tmp_path / "dev.json", 2, start=30)
    evals = tmp_path / "out" / "eval"
    train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, validation_file=val, max_steps=4,
                                                         eval_steps=2, save_steps=2, max_target_length=8))
    assert sorted(p.name for p in evals.iterdir()) == ["step-2", "step-4"]
    old = (evals / "step-2" / "metrics.json").read_text()
    train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, validation_file=val, max_steps=2,
                                                         eval_steps=2, save_steps=2, max_target_length=8, seed=8,
                                                         overwrite_output_dir=True))
    assert sorted(p.name for p in evals.iterdir()) == ["step-2"]  # this run's, kept; the old step-4 gone
    assert (evals / "step-2" / "metrics.json").read_text() != old
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-2"]


# ------------------------------------------------------------------------------------ micro-batches, optimizer, schedule


def test_micro_batches_add_up_to_the_original_step_loss(loaded, train_file):
    """Weighted micro-batches cut across accumulation groups give the original's mean of group token-means."""
    from backend.data import collate_train, preprocess_train, read_examples
    from backend.training import new_prefix_encoder

    features = preprocess_train(list(read_examples(train_file, "content", "summary")), loaded.tokenizer, 24, 24)
    plan = StepPlan(features, 2, 3, seed=5)  # B 2 x A 3
    encoder = new_prefix_encoder(loaded.model.config, 4, False, torch.device("cpu"), seed=0)
    step = PrefixStep(loaded.model, encoder, 2e-2, total_steps=1)
    with torch.no_grad():
        original = sum(step.loss(collate_train([features[i] for i in plan.group(j)])).item() for j in range(3)) / 3
        for size in (1, 4, 6):
            cut = sum(step.loss(mb.batch, None, mb.row_weights).item() for mb in plan.micro_batches(0, size))
            assert cut == pytest.approx(original, rel=1e-5), size


@pytest.mark.parametrize("micro", [4, None])
def test_micro_batch_size_changes_neither_losses_nor_prefix(loaded, train_file, tmp_path, micro):
    """train.sh's 1 x 16: one example at a time, 4 at a time and auto give the same curve and prefix."""
    def run(name, size):
        events = []
        req = request(tmp_path / name, train_file, per_device_train_batch_size=1, gradient_accumulation_steps=16,
                      max_steps=3, save_steps=3, micro_batch_size=size)
        train_prefix(loaded.model, loaded.tokenizer, req, progress=events.append)
        state = json.loads((tmp_path / name / "out" / "checkpoint-3" / "trainer_state.json").read_text())
        return losses(events), torch.load(tmp_path / name / "out" / "checkpoint-3" / "pytorch_model.bin"), state

    one, other = run("one", 1), run("other", micro)
    assert other[2]["micro_batch_size"] == (micro or 8) and one[2]["micro_batch_size"] == 1
    assert other[0] == pytest.approx(one[0], rel=1e-5)
    assert all(torch.allclose(one[1][k], other[1][k], atol=1e-5) for k in one[1])


def _adamw_hf_float64(param, grads, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """The transformers 4.30 AdamW update rule, spelled out in float64."""
    p, m, v = param.double().clone(), torch.zeros_like(param, dtype=torch.float64), torch.zeros_like(param, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p = p - lr * (1 - betas[1] ** t) ** 0.5 / (1 - betas[0] ** t) * m / (v.sqrt() + eps)
        p = p - lr * weight_decay * p
    return p


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_hf_is_the_transformers_430_update(weight_decay):
    g = torch.Generator().manual_seed(0)
    start = torch.randn(64, generator=g)
    grads = [torch.randn(64, generator=g) * 10.0 ** -(4 + k) for k in range(6)]  # down to eps's size: where the two differ
    expected = _adamw_hf_float64(start, grads, lr=2e-2, weight_decay=weight_decay)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        p = torch.nn.Parameter(start.to(dtype).clone())
        opt = AdamWHF([p], lr=2e-2, weight_decay=weight_decay)
        for grad in grads:
            p.grad = grad.to(dtype)
            opt.step()
        assert torch.allclose(p.detach().double(), expected, atol=tol, rtol=0), dtype
    q = torch.nn.Parameter(start.double().clone())
    torch_opt = torch.optim.AdamW([q], lr=2e-2, weight_decay=weight_decay)
    for grad in grads:
        q.grad = grad.double()
        torch_opt.step()
    assert (q.detach() - expected).abs().max() > 1e-4  # torch's AdamW is a different update


def test_schedule_and_warmup_come_from_transformers(loaded):
    from transformers import get_scheduler

    from backend.training import new_prefix_encoder

    encoder = new_prefix_encoder(loaded.model.config, 4, False, torch.device("cpu"), seed=0)
    step = PrefixStep(loaded.model, encoder, 1e-2, total_steps=10, lr_scheduler_type="cosine", warmup_steps=3)
    reference = get_scheduler("cosine", torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2),
                              num_warmup_steps=3, num_training_steps=10)
    for _ in range(5):
        encoder.embedding.weight.grad = torch.zeros_like(encoder.embedding.weight)
        step.step()
        reference.optimizer.step()
        reference.step()
        assert step.learning_rate == pytest.approx(reference.get_last_lr()[0])


def test_warmup_ratio_and_unknown_schedules(loaded, train_file, tmp_path):
    events = []
    train_prefix(loaded.model, loaded.tokenizer, request(tmp_path / "a", train_file, max_steps=4, warmup_ratio=0.5),
                 progress=events.append)
    assert [round(e.learning_rate / 5e-2, 6) for e in events if e.event == "log"] == [0.5, 1.0, 0.5, 0.0]
    with pytest.raises(BackendError, match="`lr_scheduler_type` 'wobbly' is not a schedule transformers knows"):
        train_prefix(loaded.model, loaded.tokenizer, request(tmp_path / "b", train_file, lr_scheduler_type="wobbly"))


def test_report_to_a_missing_tracker_is_one_sentence(loaded, train_file, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    with pytest.raises(BackendError, match="needs the tensorboard package: pip install tensorboard"):
        train_prefix(loaded.model, loaded.tokenizer, request(tmp_path, train_file, report_to="tensorboard"))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ blends


def test_blend_follows_the_weights_and_the_seed():
    from backend.training.batches import blended_order

    order = blended_order([100, 50], [0.2, 0.8], seed=3, epoch=0)
    assert len(order) == 150 and order == blended_order([100, 50], [0.2, 0.8], seed=3, epoch=0)
    share = sum(1 for i in order if i >= 100) / len(order)
    assert 0.7 < share < 0.9  # drawn 80% from the small file: it repeats, in its own shuffled laps
    assert order != blended_order([100, 50], [0.2, 0.8], seed=4, epoch=0)
    assert order != blended_order([100, 50], [0.2, 0.8], seed=3, epoch=1)


def test_blended_training_runs_and_bad_blends_are_refused(loaded, train_file, tmp_path):
    other = write_data(tmp_path / "chat.json", 10, start=30)
    result = train_prefix(loaded.model, loaded.tokenizer,
                          request(tmp_path / "ok", [train_file, other], mix=[0.7, 0.3], max_steps=2))
    assert result.steps_done == 2
    with pytest.raises(BackendError, match="`mix` weights must be positive"):
        train_prefix(loaded.model, loaded.tokenizer, request(tmp_path / "a", [train_file, other], mix=[1.0, 0.0]))
    with pytest.raises(BackendError, match="`mix` gives 1 weights for 2"):
        train_prefix(loaded.model, loaded.tokenizer, request(tmp_path / "b", [train_file, other], mix=[1.0]))
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"content": "a", "summary": "b", "extra": 1}) + "\n", encoding="utf-8")
    with pytest.raises(BackendError, match="has the columns content, summary, extra but .* has content, summary"):
        train_prefix(loaded.model, loaded.tokenizer, request(tmp_path / "c", [train_file, odd], mix=[1.0, 1.0]))


def test_auto_takes_the_largest_micro_batch_that_fits():
    from backend.training.memory import CPU_MICRO_BATCH, MARGIN, pick_micro_batch, smaller_micro_batch

    gb = 10**9
    assert pick_micro_batch(16, 1 * gb, 100 * gb) == 16  # a big card: the whole step at once
    assert pick_micro_batch(16, 1 * gb, int(5 * MARGIN * gb)) == 4  # a small one: the largest divisor that fits
    assert pick_micro_batch(16, 1 * gb, int(0.5 * gb)) is None  # not even one: the caller refuses in one sentence
    assert [smaller_micro_batch(n, 16) for n in (16, 8, 4, 2, 1)] == [8, 4, 2, 1, None]
    assert CPU_MICRO_BATCH == 8


def test_auto_recompute_keeps_the_mlp_activations_unless_recomputing_fits_a_larger_micro_batch():
    from backend.training.memory import best_fit

    assert best_fit({False: 16, True: 16}) == (16, False)  # a big card: keep them, fewer FLOPs a step
    assert best_fit({False: 4, True: 8}) == (8, True)  # a small one: recompute for twice the micro-batch
    assert best_fit({False: None, True: 2}) == (2, True)
    assert best_fit({True: 4}) == (4, True)  # --recompute-mlp given: the one option
    assert best_fit({False: None, True: None}) is None


def test_tokenized_data_is_cached_for_the_next_run(loaded, train_file, tmp_path, monkeypatch):
    import backend.training.inputs as inputs

    plain = []
    train_prefix(loaded.model, loaded.tokenizer, request(tmp_path / "plain", train_file, max_steps=2), progress=plain.append)
    monkeypatch.setattr(inputs, "CACHE_MIN_EXAMPLES", 0)
    monkeypatch.setenv("GLMCHAT_DATA_CACHE", str(tmp_path / "cache"))
    first = []
    train_prefix(loaded.model, loaded.tokenizer, request(tmp_path / "first", train_file, max_steps=2), progress=first.append)
    assert len(list((tmp_path / "cache" / "glmchat-features").iterdir())) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(inputs, "preprocess_train", no_tokenizing)
    second = []
    train_prefix(loaded.model, loaded.tokenizer, request(tmp_path / "second", train_file, max_steps=2), progress=second.append)
    assert losses(plain) == pytest.approx(losses(first), rel=1e-6) and losses(second) == pytest.approx(losses(first), rel=1e-6)
    with pytest.raises(AssertionError, match="tokenized again"):  # other lengths: another cache entry
        train_prefix(loaded.model, loaded.tokenizer, request(tmp_path / "third", train_file, max_steps=2, max_target_length=20))
