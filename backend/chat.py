"""The original model's chat API (``chat``, ``stream_chat``), mixed into the model class."""

from __future__ import annotations

from typing import Optional

import torch
from transformers import LogitsProcessorList

from .generation import InvalidScoreLogitsProcessor, generate_tokens, process_response, stream_text
from .kv_cache import KVCache
from .service import History, SamplingParams


class ChatMixin:
    def build_inputs(self, tokenizer, query: str, history: Optional[History] = None):
        if getattr(tokenizer, "family", "chatglm2") == "chatglm3":  # history: {role, content} dicts
            return tokenizer.build_chat_input(query, history=list(history or [])).to(self.device)
        prompt = tokenizer.build_prompt(query, history or [])
        return tokenizer([prompt], return_tensors="pt").to(self.device)

    @torch.inference_mode()
    def chat(
        self,
        tokenizer,
        query: str,
        history: Optional[History] = None,
        max_length: int = 8192,
        num_beams: int = 1,
        do_sample: bool = True,
        top_p: float = 0.8,
        temperature: float = 0.8,
        logits_processor: Optional[LogitsProcessorList] = None,
        **kwargs,
    ):
        """Answer ``query`` after ``history``; returns ``(response, history + [(query, response)])``.

        With a ChatGLM3 tokenizer it is ChatGLM3's chat(): ``history`` is a list of {role, content}
        dicts, ``role=`` may be passed, and the new history holds the query and the reply as dicts."""
        if getattr(tokenizer, "family", "chatglm2") == "chatglm3":
            return self._chat_chatglm3(tokenizer, query, history, max_length, num_beams, do_sample, top_p, temperature, logits_processor, **kwargs)
        history = list(history or [])
        logits_processor = LogitsProcessorList(logits_processor or [])
        logits_processor.append(InvalidScoreLogitsProcessor())
        gen_kwargs = {"num_beams": num_beams, "do_sample": do_sample, "logits_processor": logits_processor, **kwargs}
        if "max_new_tokens" not in kwargs:
            gen_kwargs["max_length"] = max_length
        if do_sample:
            gen_kwargs.update(top_p=top_p, temperature=temperature)
        inputs = self.build_inputs(tokenizer, query, history)
        outputs = self.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **gen_kwargs)
        response = process_response(tokenizer.decode(outputs[0, inputs["input_ids"].shape[1]:].tolist()))
        return response, history + [(query, response)]

    def _chat_chatglm3(self, tokenizer, query, history, max_length, num_beams, do_sample, top_p, temperature,
                       logits_processor, role: str = "user", **kwargs):
        """As the original: generate to a stop id, drop the last generated token, split off metadata."""
        history = [dict(turn) for turn in history or []]
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(InvalidScoreLogitsProcessor())
        gen_kwargs = {"max_length": max_length, "num_beams": num_beams, "do_sample": do_sample,
                      "logits_processor": processors, **kwargs}
        if do_sample:
            gen_kwargs.update(top_p=top_p, temperature=temperature)
        inputs = tokenizer.build_chat_input(query, history=history, role=role).to(self.device)
        outputs = self.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                eos_token_id=tokenizer.chat_stop_ids(), **gen_kwargs)
        reply = tokenizer.chat_response(outputs[0, inputs["input_ids"].shape[1]:].tolist())
        history += [{"role": role, "content": query}, {"role": "assistant", "metadata": "", "content": reply}]
        return reply, history

    @torch.inference_mode()
    def stream_chat(
        self,
        tokenizer,
        query: str,
        history: Optional[History] = None,
        past_key_values: Optional[KVCache] = None,
        max_length: int = 8192,
        do_sample: bool = True,
        top_p: float = 0.8,
        temperature: float = 0.8,
        logits_processor=None,
        return_past_key_values: bool = False,
        max_new_tokens: Optional[int] = None,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
    ):
        """Yield ``(response_so_far, history)`` as the reply grows, like the original.

        ``past_key_values`` may be the cache returned by an earlier call (with
        ``return_past_key_values=True``); the tokens it holds must begin this prompt.
        """
        history = list(history or [])
        input_ids = self.build_inputs(tokenizer, query, history)["input_ids"]
        cache = past_key_values if past_key_values is not None else KVCache()
        params = SamplingParams(
            temperature=temperature if do_sample else 0.0,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            max_new_tokens=max_new_tokens or max(1, max_length - input_ids.shape[1]),
        )
        eos = tokenizer.chat_stop_ids()
        chatglm3 = getattr(tokenizer, "family", "chatglm2") == "chatglm3"
        for response in stream_text(tokenizer, generate_tokens(self, input_ids, cache, params, eos), eos):
            new_turns = [{"role": "user", "content": query}, {"role": "assistant", "metadata": "", "content": response}]
            new_history = history + (new_turns if chatglm3 else [(query, response)])
            yield (response, new_history, cache) if return_past_key_values else (response, new_history)
