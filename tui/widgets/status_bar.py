"""One line under the prompt: model and its family/variant, precision, active adapter, last reply's speed, GPU memory."""

from __future__ import annotations

from typing import Optional

from textual import work
from textual.content import Content
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Static

from ..export import adapter_label

GPU_POLL_S = 2.0
WATCHED = ("model_info", "active_adapter", "compare_mode", "last_tokens_per_s", "training_status")


class StatusBar(Static):
    gpu_memory: reactive[Optional[float]] = reactive(None)

    class GpuMemory(Message):
        def __init__(self, gigabytes: Optional[float]) -> None:
            super().__init__()
            self.gigabytes = gigabytes

    def on_mount(self) -> None:
        for name in WATCHED:
            self.watch(self.app, name, lambda _value: self.refresh_status(), init=False)
        self.watch(self.app, "model_info", lambda _value: self._poll_gpu(), init=False)  # at once when loaded
        self.refresh_status()
        self.set_interval(GPU_POLL_S, self._poll_gpu)

    def _poll_gpu(self) -> None:
        if getattr(self.app, "backend", None) is not None:
            self._read_gpu_memory()

    @work(thread=True, exclusive=True, exit_on_error=False, group="gpu-memory")
    def _read_gpu_memory(self) -> None:
        try:
            gigabytes = self.app.backend.gpu_memory_gb()
        except Exception:  # a status figure is not worth an error dialog
            gigabytes = None
        self.post_message(self.GpuMemory(gigabytes))

    def on_status_bar_gpu_memory(self, message: GpuMemory) -> None:
        self.gpu_memory = message.gigabytes

    def watch_gpu_memory(self) -> None:
        self.refresh_status()

    def refresh_status(self) -> None:
        app = self.app
        info = app.model_info
        if info is None:
            self.update(Content.styled("loading the model…", "italic $text-muted"))
            return
        sep = (" │ ", "$text-muted")
        name = info.name.rstrip("/").rsplit("/", 1)[-1] or info.name  # a directory or hub id: its last part
        parts: list = [(name, "bold")]
        variant = getattr(info, "variant", None)
        if variant and variant.lower() != name.lower():  # which release this is, when the name does not say
            parts.append((f" {variant}", "$text-muted"))
        parts += [f" · {info.precision} · {info.device}", sep]
        if app.compare_mode:
            left, right = app.compare_pair()
            parts += [("compare ", "$text-muted"), (f"{adapter_label(left)} ⇄ {adapter_label(right)}", "bold $text-accent")]
        else:
            parts += [("adapter ", "$text-muted"), (adapter_label(app.active_adapter), "bold $text-accent")]
        if app.last_tokens_per_s is not None:
            parts += [sep, f"{app.last_tokens_per_s:.1f} tok/s"]
        if self.gpu_memory is not None:
            parts += [sep, f"GPU {self.gpu_memory:.1f} GB"]
        if app.training_status:
            parts += [sep, (app.training_status, "$text-warning")]
        self.update(Content.assemble(*parts))
