"""ChatGLM2-6B and ChatGLM3-6B tokenizers: SentencePiece BPE plus GLM specials, as transformers 5 slow tokenizers.

Re-implementations of the `tokenization_chatglm.py` files that ship with THUDM/chatglm2-6b and
THUDM/chatglm3-6b, so that checkpoints load without running their remote code. Ids match the
originals id for id (../shared/reference/golden/tokenizer_shared.json and tests/fixtures/ pin them).
Text is always encoded as text: a user typing "</s>", "[gMASK]" or "<|user|>" gets ordinary
pieces, as with the originals; only the prompt builders add control ids.
"""

from __future__ import annotations

import json
import os

from sentencepiece import SentencePieceProcessor
from transformers import BatchEncoding
from transformers import PreTrainedTokenizer
from transformers.utils import PaddingStrategy

from .chat_format import chatglm2_query_history, chatglm3_response
from .service import BackendError, ChatMessage

# Appended after the SentencePiece pieces, in this order: ids n..n+4 where n = sp.vocab_size().
GLM_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLE_SPECIALS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")  # ChatGLM3 appends these


class ChatGLMTokenizer(PreTrainedTokenizer):
    """SentencePiece pieces 0..n-1, then [MASK], [gMASK], [sMASK], sop, eop; pad = unk (0), eos = 2.

    Inputs with special tokens start with `[gMASK] sop`; batches are padded on the left and carry
    `position_ids` (0 for pads, 0..len-1 for real tokens) because the model reads them.
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    family = "chatglm2"
    specials = GLM_SPECIALS
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    def __init__(self, vocab_file, padding_side="left", clean_up_tokenization_spaces=False, **kwargs):
        self.vocab_file = vocab_file
        self.sp_model = SentencePieceProcessor(model_file=str(vocab_file))
        n = self.sp_model.vocab_size()
        self.special_ids = {name: n + i for i, name in enumerate(self.specials)}
        self.special_names = {i: name for name, i in self.special_ids.items()}
        sp = self.sp_model
        # The original's decode turns these into "" (it returns "" for them in convert_id_to_token).
        self._silent_ids = {i for i in (sp.unk_id(), sp.bos_id(), sp.eos_id()) if i >= 0} | set(self.special_names)
        # The release's tokenizer_config.json points at its own python file; we are that code, so drop it
        # (otherwise save_pretrained would write the auto_map back and loaders would look for remote code).
        kwargs.pop("auto_map", None)
        kwargs.pop("tokenizer_class", None)
        for attr, sp_id in (("unk_token", sp.unk_id()), ("pad_token", sp.unk_id()),
                            ("bos_token", sp.bos_id()), ("eos_token", sp.eos_id())):
            if sp_id >= 0:
                kwargs.setdefault(attr, sp.id_to_piece(sp_id))
        # The GLM specials are deliberately NOT registered as added tokens: the original never split
        # them out of text, so a user typing "[gMASK]" or "sop" gets ordinary SentencePiece pieces.
        # Nor are <unk>, <s>, </s> split out (transformers would, as registered special tokens): the
        # originals encode a typed "</s>" as text too.
        kwargs["split_special_tokens"] = True
        kwargs["family"] = self.family  # saved in tokenizer_config.json: how a directory says its family
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.vocab_size() + len(self.specials)

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.sp_model.vocab_size())}
        vocab.update(self.special_ids)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def get_command(self, token: str) -> int:
        """Id of a special by name, as the original's `get_command` ("<eos>", "[gMASK]", "sop", ...)."""
        sp = self.sp_model
        aliases = {"<bos>": sp.bos_id(), "<eos>": sp.eos_id(), "<pad>": sp.unk_id(), "<unk>": sp.unk_id()}
        return aliases[token] if token in aliases else self.special_ids[token]

    def get_prefix_tokens(self) -> list[int]:
        return [self.special_ids["[gMASK]"], self.special_ids["sop"]]

    def _tokenize(self, text, **kwargs):
        return self.sp_model.encode_as_pieces(text)

    def _convert_token_to_id(self, token):
        # The original looks special names up first. We do so only when the name is not also a real
        # piece of the SentencePiece model (never the case for the real model, but a small model
        # trained elsewhere could hold a "sop" piece, which would otherwise be hijacked mid-text).
        sp_id = self.sp_model.piece_to_id(token)
        if token in self.special_ids and sp_id == self.sp_model.unk_id():
            return self.special_ids[token]
        return sp_id

    def _convert_id_to_token(self, index):
        return self.special_names.get(index) or self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(tokens)

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs) -> str:
        """Decode like the original: the GLM specials, <unk>/<s>/</s> and negative ids (label -100)
        vanish whether or not `skip_special_tokens` is set, and the rest goes through sp's piece decoder.
        Ids past the vocabulary (the model's padded rows, which an untrained model can emit) vanish too."""
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        size, silent = self.vocab_size, self._silent_ids  # (a property: once, not once an id)
        kept = [i for i in map(int, ids) if 0 <= i < size and i not in silent]
        # (kept ids are all SentencePiece's: sp decodes them as it would their pieces, without a Python call an id;
        # a streamed reply decodes a window every token, for every reply at once on a server)
        text = self.sp_model.decode(kept)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def build_prompt(self, query: str, history: list[tuple[str, str]] | None = None) -> str:
        """The ChatGLM2 chat format: numbered rounds of 问/答, the last one open for the reply."""
        prompt = ""
        for i, (old_query, response) in enumerate(history or []):
            prompt += f"[Round {i + 1}]\n\n问：{old_query}\n\n答：{response}\n\n"
        return prompt + f"[Round {len(history or []) + 1}]\n\n问：{query}\n\n答："

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """`[gMASK] sop a`, or `[gMASK] sop a b </s>` for a pair (the original's training layout)."""
        ids = self.get_prefix_tokens() + token_ids_0
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.get_command("<eos>")]
        return ids

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return [int(int(i) in self._silent_ids) for i in token_ids_0]
        mask = [1, 1] + [0] * len(token_ids_0)
        return mask if token_ids_1 is None else mask + [0] * len(token_ids_1) + [1]

    def _pad(self, encoded_inputs, max_length=None, padding_strategy=PaddingStrategy.DO_NOT_PAD,
             pad_to_multiple_of=None, padding_side=None, return_attention_mask=None) -> dict:
        """The original's `_pad`: always adds attention_mask and position_ids, pads on the left only."""
        if (padding_side or self.padding_side) != "left":
            raise ValueError("ChatGLMTokenizer pads on the left only (pads take position 0, as in the original)")
        required_input = encoded_inputs[self.model_input_names[0]]
        seq_length = len(required_input)
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = seq_length
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of != 0:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        encoded_inputs.setdefault("attention_mask", [1] * seq_length)
        encoded_inputs.setdefault("position_ids", list(range(seq_length)))
        if padding_strategy != PaddingStrategy.DO_NOT_PAD and seq_length != max_length:
            difference = max_length - seq_length
            encoded_inputs["attention_mask"] = [0] * difference + encoded_inputs["attention_mask"]
            encoded_inputs["position_ids"] = [0] * difference + encoded_inputs["position_ids"]
            encoded_inputs[self.model_input_names[0]] = [self.pad_token_id] * difference + required_input
        return encoded_inputs

    # ------------------------------------------------------------ chat format (one entry for the engine)

    def build_chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        """The prompt ids for the reply to the last user message: the ChatGLM2 rounds, with a leading
        system message put in front of the current query (the original ``openai_api.py``)."""
        query, history = chatglm2_query_history(messages)
        return self.encode(self.build_prompt(query, history))

    def chat_stop_ids(self) -> list[int]:
        return [self.eos_token_id]

    def chat_response(self, new_ids: list[int]) -> str:
        """The reply text of generated ids, as the original chat() cleans it."""
        stops = set(self.chat_stop_ids())
        return self.decode([i for i in new_ids if i not in stops]).strip().replace("[[训练时间]]", "2023年")

    def save_vocabulary(self, save_directory, filename_prefix=None):
        """Writes the SentencePiece model as `tokenizer.model` (from memory: the source file may be gone)."""
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        path = os.path.join(save_directory, name) if os.path.isdir(save_directory) else save_directory
        with open(path, "wb") as f:
            f.write(self.sp_model.serialized_model_proto())
        return (path,)


class ChatGLM3Tokenizer(ChatGLMTokenizer):
    """ChatGLM3-6B: the same pieces, four role tokens after the GLM specials, and its own chat format.

    Decoding keeps the specials' names in the text (the original's ``process_response`` splits tool
    calls on "<|assistant|>"); <unk>, <s> and </s> still vanish."""

    family = "chatglm3"
    specials = GLM_SPECIALS + ROLE_SPECIALS

    def __init__(self, vocab_file, **kwargs):
        super().__init__(vocab_file, **kwargs)
        self._silent_ids = {i for i in self._silent_ids if i not in self.special_names}

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs) -> str:
        """As the original: every id becomes its piece (a special its name, <unk>/<s>/</s> and ids
        outside the vocabulary nothing) and SentencePiece joins them."""
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        size, silent = self.vocab_size, self._silent_ids
        pieces = ["" if not 0 <= i < size or i in silent else self._convert_id_to_token(i) for i in map(int, ids)]
        return self.sp_model.decode_pieces(pieces)

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """``<|role|>`` then ``metadata + "\n"`` and the message, each encoded as plain text."""
        if role not in ("system", "user", "assistant", "observation"):
            raise BackendError(f"unknown chat role {role!r}; ChatGLM3 has system, user, assistant and observation.")
        return [self.special_ids[f"<|{role}|>"]] + self.sp_model.encode(f"{metadata}\n") + self.sp_model.encode(message)

    def chat_input_ids(self, query: str, history: list[dict] | None = None, role: str = "user") -> list[int]:
        """The ids of the original ``build_chat_input``: ``[gMASK] sop``, the history's messages
        (dicts with role, content and optional metadata; a system entry's tools as indented JSON),
        the query as ``role``, then ``<|assistant|>``."""
        ids = self.get_prefix_tokens()
        for item in history or []:
            content = item["content"]
            if item["role"] == "system" and "tools" in item:
                content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
            ids += self.build_single_message(item["role"], item.get("metadata", ""), content)
        return ids + self.build_single_message(role, "", query) + [self.special_ids["<|assistant|>"]]

    def build_chat_input(self, query: str, history: list[dict] | None = None, role: str = "user") -> BatchEncoding:
        """As the original: a batch of one with input_ids, attention_mask and position_ids tensors."""
        return self.pad({"input_ids": [self.chat_input_ids(query, history, role)]}, return_tensors="pt")

    def build_chat_ids(self, messages: list[ChatMessage]) -> list[int]:
        """Every message but the last is history (system, user, assistant, observation); the last is
        the query in its own role (user or observation)."""
        if not messages or messages[-1].role not in ("user", "observation"):
            raise BackendError("the last message must be the user's (or a tool's observation) for ChatGLM3 to answer.")
        history = [{"role": m.role, "content": m.content} for m in messages[:-1]]
        return self.chat_input_ids(messages[-1].content, history, messages[-1].role)

    def chat_stop_ids(self) -> list[int]:
        return [self.eos_token_id, self.special_ids["<|user|>"], self.special_ids["<|observation|>"]]

    def chat_response(self, new_ids: list[int]) -> str:
        """As the original chat(): the last generated token is dropped (the stop token, or a real one
        when the length ran out), the rest decoded and its metadata line split off."""
        return chatglm3_response(self.decode(list(new_ids)[:-1])).text


def tokenizer_class(family: str) -> type[ChatGLMTokenizer]:
    return ChatGLM3Tokenizer if family == "chatglm3" else ChatGLMTokenizer
