"""The embedded demo: a small ChatGLM2-architecture model and a P-Tuning v2 adapter, shipped built.

``glmchat --demo`` needs no download, no GPU and no wait: the package carries the built demo (about 5 MB
of safetensors in ``assets/demo/shipped``), which this module's recipe trains, on the CPU and in about
two minutes on two cores, from text this project ships:

* a SentencePiece BPE tokenizer (byte fallback, so any input encodes) on ``assets/demo/chat.json``
  and ``assets/sample/*.json``;
* a base model (``ChatGLMForConditionalGeneration``, 2 layers, hidden 128), trained full-parameter from
  scratch on the chat lines of ``assets/demo/chat.json`` in the ChatGLM2 prompt format (loss on the
  replies), plus the sample product texts laid out as a catalogue (``商品：属性\\n文案：text``). Like a
  real base model's pretraining text, the catalogue gives it the language of ad copy, but asked in chat
  it answers an attribute list with a plain explanation, not with ad copy;
* an ``advertisegen`` adapter, trained with our own P-Tuning v2 (``backend.training.train_prefix``) on
  ``assets/sample/train.json`` over the frozen base: with it, the same attribute list gets ad copy, also after
  earlier rounds of a conversation (half of its examples follow 1-6 earlier turns: chat, attribute lists the
  base answered, ad copy).

``python -m backend.demo --build assets/demo/shipped`` rebuilds the shipped files; the build is
deterministic (one thread, deterministic algorithms), and tests/test_demo.py checks that it reproduces
them. The shipped manifest names the hash of the recipe and the data files it was built from; when
either has changed (an edited ``chat.json``), the first start builds the demo instead and caches it in
``user_cache_dir("glmchat")/demo-v{N}-{hash}`` (``GLMCHAT_CACHE_DIR`` overrides the cache root). A
build happens in a temporary directory that is renamed into place once complete, so a killed build is
never used; the next start removes its leftovers and builds again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from .service import BackendError, LoadProgress
from .user_cache import cache_root

DEMO_VERSION = 1


def assets_dir(module_file: Union[str, Path] = __file__, prefixes: Optional[list] = None) -> Path:
    """assets/ of the checkout (or editable install), else the copy a wheel installs under
    ``<prefix>/share/glmchat/assets`` (pyproject's data-files)."""
    checkout = Path(module_file).resolve().parents[1] / "assets"
    if checkout.is_dir():
        return checkout
    if prefixes is None:
        prefixes = [sys.prefix, sys.base_prefix, sysconfig.get_config_var("userbase") or ""]
    for prefix in prefixes:
        installed = Path(prefix) / "share" / "glmchat" / "assets"
        if installed.is_dir():
            return installed
    return checkout  # missing: _read_asset says so


ASSETS = assets_dir()
CHAT_FILE = ASSETS / "demo" / "chat.json"  # {"prompt", "response"} lines: the base model's chat text
SAMPLE_TRAIN = ASSETS / "sample" / "train.json"  # AdvertiseGen-style {"content", "summary"} lines
SAMPLE_DEV = ASSETS / "sample" / "dev.json"
SHIPPED = ASSETS / "demo" / "shipped"  # the built demo the package carries (python -m backend.demo --build)
MANIFEST = "demo.json"  # written last: a demo directory without it is incomplete
ADAPTER_NAME = "advertisegen"
CATALOGUE_PROMPT = "商品：{content}\n文案："  # how product texts appear in the base's training text

# Everything that shapes the result; it is part of the cache directory's hash.
RECIPE = {
    # Phrase-sized pieces (short sequences, fluent replies); "#" and "*" always stand alone, so that each
    # attribute value of an AdvertiseGen prompt is a piece of its own.
    "tokenizer": {"vocab_size": 3000, "split_by_unicode_script": False, "max_sentencepiece_length": 16,
                  "user_defined_symbols": ["#", "*"]},
    "model": {"num_layers": 2, "hidden_size": 128, "ffn_hidden_size": 384, "num_attention_heads": 4,
              "kv_channels": 32, "multi_query_group_num": 2, "seq_length": 2048},
    "base": {"steps": 1100, "batch_size": 16, "learning_rate": 3e-3, "warmup": 0.05, "final_lr": 0.1,
             "history_rate": 0.3, "seed": 0},
    "adapter": {"pre_seq_len": 16, "learning_rate": 1e-1, "batch_size": 8, "steps": 300,
                "max_source_length": 128, "max_target_length": 64, "history_rate": 0.5, "history_turns": 6,
                "history_source_length": 256, "seed": 42},
}


@dataclass(frozen=True)
class DemoFiles:
    model_dir: Path  # a complete ChatGLM2 model directory (config, weights, tokenizer)
    adapters_dir: Path  # holds advertisegen/checkpoint-N, to scan for adapters
    root: Path  # the cached demo directory


# ----------------------------------------------------------------------------------- cache paths


def recipe_hash() -> str:
    """Short hash of the recipe, the data files and the demo version: a change means a new directory."""
    h = hashlib.sha256(json.dumps({"version": DEMO_VERSION, "recipe": RECIPE}, sort_keys=True).encode())
    for path in (CHAT_FILE, SAMPLE_TRAIN, SAMPLE_DEV):
        h.update(_read_asset(path))
    return h.hexdigest()[:12]


def demo_dir(cache_dir: Union[str, Path, None] = None) -> Path:
    return cache_root(cache_dir) / f"demo-v{DEMO_VERSION}-{recipe_hash()}"


def _read_asset(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        raise BackendError(
            f"the demo's training text {path} is missing; reinstall glmchat (pip install glmchat, or pip install -e . "
            "in a checkout) so that its assets are present."
        ) from None


def _files(root: Path) -> DemoFiles:
    return DemoFiles(root / "model", root / "adapters", root)


def is_complete(root: Path, recipe_id: Optional[str] = None) -> bool:
    """A finished build of the recipe ``recipe_id`` (by default the hash in the directory's name): its
    manifest (written last) names that hash."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = _files(root)
    return (
        isinstance(manifest, dict)
        and manifest.get("hash") == (recipe_id or root.name.rsplit("-", 1)[-1])
        and (files.model_dir / "config.json").is_file()
        and (files.model_dir / "model.safetensors").is_file()
        and (files.model_dir / "tokenizer.model").is_file()
        and any(files.adapters_dir.glob(f"{ADAPTER_NAME}/checkpoint-*/model.safetensors"))
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_leftovers(root: Path, final: Path) -> None:
    """Temporary directories of builds whose process is gone, and an incomplete ``final``."""
    if not root.is_dir():
        return
    for p in root.glob(f".{final.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            pid = -1
        if pid <= 0 or not _pid_alive(pid) or time.time() - p.stat().st_mtime > 24 * 3600:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(f".{final.name}.trash-*"):
        shutil.rmtree(p, ignore_errors=True)
    if final.exists() and not is_complete(final):
        trash = root / f".{final.name}.trash-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(final, trash)  # out of the way first: a reader never sees half a directory
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------------- the entry point


def ensure_demo(
    progress: Optional[Callable[[LoadProgress], None]] = None,
    cache_dir: Union[str, Path, None] = None,
    shipped: Optional[Path] = SHIPPED,
) -> DemoFiles:
    """The demo model and adapters directory: the shipped build when it matches the recipe and the data
    files, else one built on the first call (about two minutes on 2 CPU cores) and read from the cache
    afterwards. ``progress`` gets ``LoadProgress("demo", i, n, message)`` events."""
    report = progress or (lambda p: None)
    if shipped is not None and is_complete(shipped, recipe_hash()):
        report(LoadProgress("demo", 1, 1, "demo model shipped with glmchat"))
        return _files(shipped)
    final = demo_dir(cache_dir)
    if is_complete(final):
        report(LoadProgress("demo", 1, 1, f"demo model cached in {final}"))
        return _files(final)
    root = final.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BackendError(f"cannot create the cache directory {root} ({err.strerror or err}); set GLMCHAT_CACHE_DIR to a writable directory.") from None
    _remove_leftovers(root, final)
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build_demo(tmp, final.name.rsplit("-", 1)[-1], report)
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final):  # another process finished first and its build is as good as ours
                raise
    except OSError as err:
        raise BackendError(f"could not write the demo model to {root} ({err.strerror or err}); free some space or set GLMCHAT_CACHE_DIR.") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _files(final)


# ----------------------------------------------------------------------------------- the build


def build_demo(out: Path, recipe_id: str, report: Callable[[LoadProgress], None]) -> None:
    """Build the demo into ``out`` (a new directory); the manifest, naming ``recipe_id``, is written last."""
    import torch

    start = time.perf_counter()
    base_steps, adapter_steps = RECIPE["base"]["steps"], RECIPE["adapter"]["steps"]
    total = 1 + base_steps + adapter_steps + 1

    def stage(done: int, message: str) -> None:
        report(LoadProgress("demo", done, total, message))

    # One thread and deterministic kernels: the same torch on the same kind of CPU builds the same bytes,
    # which is how the shipped files are checked against this recipe.
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    files = _files(out)
    try:
        files.model_dir.mkdir(parents=True)
        stage(0, "building the demo model: its recipe or text changed (about two minutes)")
        tokenizer = _train_tokenizer(files.model_dir, out / "_sp")
        stage(1, f"training demo model step 0/{base_steps}")
        with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
            model = _train_base(tokenizer, lambda i: stage(1 + i, f"training demo model step {i}/{base_steps}"))
        _save_model(model, files.model_dir)
        stage(1 + base_steps, f"training demo adapter step 0/{adapter_steps}")
        trained = _train_adapter(
            model, tokenizer, out / "_adapter_run",
            lambda i: stage(1 + base_steps + i, f"training demo adapter step {i}/{adapter_steps}"),
        )
        checkpoint = _save_adapter(trained, files.adapters_dir / ADAPTER_NAME / trained.name)
        shutil.rmtree(out / "_adapter_run")
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    # Nothing time-dependent: a rebuild under the same torch on the same kind of CPU compares equal.
    manifest = {
        "hash": recipe_id, "version": DEMO_VERSION, "recipe": RECIPE, "torch": torch.__version__.split("+")[0],
        "cpu": cpu_fingerprint(), "adapter": checkpoint.relative_to(out).as_posix(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    stage(total, f"demo model built in {time.perf_counter() - start:.0f} s")


def cpu_fingerprint() -> str:
    """What sets a CPU build's floating-point bits besides torch's version: the vector instructions ATen dispatches
    to and the CPU model (oneDNN and MKL pick kernels by it). 1100 training steps turn a last-bit difference into
    other weights, so a rebuild on another kind of CPU is not bit-equal."""
    import platform

    import torch

    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{torch.backends.cpu.get_cpu_capability()} {model or platform.processor() or platform.machine()}"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in _read_asset(path).decode("utf-8").splitlines() if line.strip()]


def _train_tokenizer(model_dir: Path, work: Path):
    """SentencePiece BPE that behaves like ChatGLM2's (byte fallback, no normalisation), saved in model_dir."""
    import sentencepiece as spm

    from .tokenization import ChatGLMTokenizer

    lines = []
    for row in _read_jsonl(CHAT_FILE):
        lines += [row["prompt"], row["response"]]
    for path in (SAMPLE_TRAIN, SAMPLE_DEV):
        for row in _read_jsonl(path):
            lines += [row["content"], row["summary"]]
    lines += ["[Round 1]", "[Round 2]", "[Round 3]", "问：", "答：", "商品：", "文案："] * 20
    spec = RECIPE["tokenizer"]
    work.mkdir(parents=True)
    # Written through model_writer: with model_prefix the file would record the build directory's path.
    written = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=written,
        vocab_size=spec["vocab_size"],
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_by_unicode_script=spec["split_by_unicode_script"],
        max_sentencepiece_length=spec["max_sentencepiece_length"],
        user_defined_symbols=spec["user_defined_symbols"],
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    (work / "tokenizer.model").write_bytes(written.getvalue())
    tokenizer = ChatGLMTokenizer(vocab_file=str(work / "tokenizer.model"))
    tokenizer.save_pretrained(str(model_dir))
    shutil.rmtree(work, ignore_errors=True)
    return ChatGLMTokenizer(vocab_file=str(model_dir / "tokenizer.model"))


class _BaseData:
    """The base model's training pairs (input_ids, labels): chat turns laid out as train_prefix lays them
    out (a new random earlier turn in front of some of them each epoch, so later rounds get answers too),
    and the catalogue texts."""

    def __init__(self, tokenizer, rng: random.Random):
        from .data import IGNORE_INDEX, Example

        self.tokenizer, self.rng = tokenizer, rng
        self.chat = [Example(row["prompt"], row["response"]) for row in _read_jsonl(CHAT_FILE)]
        eos = tokenizer.eos_token_id
        self.catalogue = []
        for row in _read_jsonl(SAMPLE_TRAIN):
            a = tokenizer.encode(CATALOGUE_PROMPT.format(content=row["content"]))
            b = tokenizer.encode(row["summary"], add_special_tokens=False)
            self.catalogue.append((a + b + [eos], [IGNORE_INDEX] * len(a) + b + [eos]))

    def epoch(self) -> list[tuple[list[int], list[int]]]:
        from .data import IGNORE_INDEX, Example, preprocess_train

        rate = RECIPE["base"]["history_rate"]
        examples = []
        for ex in self.chat:
            if self.rng.random() < rate:
                earlier = self.rng.choice(self.chat)
                ex = Example(ex.prompt, ex.response, ((earlier.prompt, earlier.response),))
            examples.append(ex)
        pairs = []
        for feature in preprocess_train(examples, self.tokenizer, 256, 256):
            keep = max(i for i, label in enumerate(feature["labels"]) if label != IGNORE_INDEX) + 1
            pairs.append((feature["input_ids"][:keep], feature["labels"][:keep]))
        return pairs + self.catalogue


def _train_base(tokenizer, on_step: Callable[[int], None]):
    """Full-parameter training from scratch: AdamW, warmup then cosine decay, loss on labelled tokens only."""
    import torch
    import torch.nn.functional as F

    from .configuration import ChatGLMConfig
    from .data import IGNORE_INDEX
    from .modeling import ChatGLMForConditionalGeneration

    spec = RECIPE["base"]
    torch.manual_seed(spec["seed"])
    rng = random.Random(spec["seed"])
    data = _BaseData(tokenizer, rng)
    vocab = (tokenizer.vocab_size + 63) // 64 * 64
    config = ChatGLMConfig(**RECIPE["model"], padded_vocab_size=vocab)
    model = ChatGLMForConditionalGeneration(config)
    model.train()
    steps, size = spec["steps"], spec["batch_size"]
    warmup = max(1, int(steps * spec["warmup"]))

    def lr_factor(step: int) -> float:
        cosine = 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
        return min(1.0, (step + 1) / warmup) * (spec["final_lr"] + (1 - spec["final_lr"]) * cosine)

    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["learning_rate"], betas=(0.9, 0.98), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    def batches():
        while True:  # batches of similar lengths (little padding), in a new order each epoch
            pairs = data.epoch()
            order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]), rng.random()))
            chunks = [[pairs[i] for i in order[i:i + size]] for i in range(0, len(order), size)]
            rng.shuffle(chunks)
            yield from chunks

    stream = batches()
    report_every = max(1, steps // 100)
    for step in range(1, steps + 1):
        chunk = next(stream)
        width = max(len(ids) for ids, _ in chunk)  # right padding: causal attention keeps it inert
        ids = torch.tensor([x + [0] * (width - len(x)) for x, _ in chunk])
        labels = torch.tensor([y + [IGNORE_INDEX] * (width - len(y)) for _, y in chunk])
        hidden = model.transformer(ids, use_cache=False).last_hidden_state[:, :-1]  # [b, s-1, hidden]
        targets = labels[:, 1:]
        chosen = targets != IGNORE_INDEX  # logits only where there is a label: half the output-layer work
        logits = model.transformer.output_layer(hidden[chosen]).float()  # [n, vocab]
        loss = F.cross_entropy(logits, targets[chosen])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % report_every == 0 or step == steps:
            on_step(step)
    model.eval().requires_grad_(False)
    return model


def _save_model(model, model_dir: Path) -> None:
    """config.json and model.safetensors, as save_pretrained writes them (without its progress bar)."""
    from safetensors.torch import save_file

    model.config.save_pretrained(str(model_dir))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".prefix_encoder." not in k}
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def _save_adapter(trained: Path, out: Path) -> Path:
    """Only what chatting needs from a training checkpoint: its config and the prefix as safetensors."""
    from safetensors.torch import save_file

    from .adapters import PREFIX_KEY, read_prefix_checkpoint

    ckpt = read_prefix_checkpoint(trained)
    out.mkdir(parents=True)
    state = {PREFIX_KEY + k: v.contiguous() for k, v in ckpt.state_dict.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(trained / "config.json", out / "config.json")
    return out


def demo_train_request(output_dir: Union[str, Path], train_file: Union[str, Path, None] = None):
    """The demo adapter's P-Tuning v2 settings as a TrainRequest (a few seconds on 2 CPU cores over the demo
    base), e.g. to pre-fill a training form when the demo model is loaded."""
    from .service import TrainRequest

    spec = RECIPE["adapter"]
    return TrainRequest(
        train_file=Path(train_file) if train_file else SAMPLE_TRAIN,
        output_dir=Path(output_dir),
        max_source_length=spec["max_source_length"],
        max_target_length=spec["max_target_length"],
        pre_seq_len=spec["pre_seq_len"],
        learning_rate=spec["learning_rate"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        logging_steps=max(1, spec["steps"] // 20),
        save_steps=0,
        seed=spec["seed"],
    )


def _train_adapter(model, tokenizer, output_dir: Path, on_step: Callable[[int], None]) -> Path:
    """The advertisegen adapter: our P-Tuning v2 trainer on the sample data, over the frozen base."""
    from .training import train_prefix

    from .data import Example, build_prompt
    from .training import TrainingData, read_training_data

    spec = RECIPE["adapter"]
    steps = spec["steps"]
    every = max(1, steps // 50)
    # (the training panel's defaults keep max_source_length; the shipped adapter also sees conversations that long)
    request = dataclasses.replace(demo_train_request(output_dir), max_source_length=spec["history_source_length"])
    # Half the examples follow earlier turns of a conversation as the app builds them: chat, attribute lists the base
    # answered in its own words, ad copy the adapter wrote; so the adapter writes ad copy later in a
    # conversation too, and in compare's adapter column after rounds the base answered.
    rng = random.Random(spec["seed"])
    chat = [Example(row["prompt"], row["response"]) for row in _read_jsonl(CHAT_FILE)]
    base_on_attributes = [ex for ex in chat if "#" in ex.prompt]
    ads = read_training_data(request).train
    train = []
    for ex in ads:
        history = []
        if rng.random() < spec["history_rate"]:
            for _ in range(rng.randint(1, spec["history_turns"])):
                earlier = rng.choice((chat, base_on_attributes, ads))
                turn = rng.choice(earlier)
                history.append((turn.prompt, turn.response))
        # the oldest turns go first where the prompt would not fit: the trainer cuts a long prompt's end
        while history and len(tokenizer.encode(build_prompt(tokenizer, ex.prompt, tuple(history)))) > request.max_source_length:
            history.pop(0)
        train.append(Example(ex.prompt, ex.response, tuple(history)) if history else ex)
    result = train_prefix(model, tokenizer, request, data=TrainingData(train),
                          on_step=lambda i, n: on_step(i) if i % every == 0 or i == n else None)
    if result.last_checkpoint is None:
        raise BackendError("training the demo adapter saved no checkpoint.")
    return Path(result.last_checkpoint)


def main(argv: Optional[list] = None) -> int:
    """``python -m backend.demo --build OUT``: build the demo into OUT (a new directory), as shipped."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m backend.demo", description=main.__doc__)
    parser.add_argument("--build", metavar="OUT", type=Path, required=True,
                        help="directory to create (assets/demo/shipped to refresh the shipped demo)")
    args = parser.parse_args(argv)
    if args.build.exists():
        parser.error(f"{args.build} exists; remove it first (a build writes a new directory)")

    def show(event: LoadProgress) -> None:
        print(f"[{event.current}/{event.total}] {event.message}", file=sys.stderr)

    build_demo(args.build, recipe_hash(), show)
    return 0


if __name__ == "__main__":
    sys.exit(main())
