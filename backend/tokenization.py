"""ChatGLM2-6B tokenizer: SentencePiece BPE plus five GLM specials, as a transformers 5 slow tokenizer.

A re-implementation of the `tokenization_chatglm.py` that ships with THUDM/chatglm2-6b, so that
checkpoints load without running their remote code. Ids match the original id for id (the golden
file in ../shared/reference/golden/tokenizer_shared.json pins them).
"""

from __future__ import annotations

import os

from sentencepiece import SentencePieceProcessor
from transformers import PreTrainedTokenizer
from transformers.utils import PaddingStrategy

# Appended after the SentencePiece pieces, in this order: ids n..n+4 where n = sp.vocab_size().
GLM_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")


class ChatGLMTokenizer(PreTrainedTokenizer):
    """SentencePiece pieces 0..n-1, then [MASK], [gMASK], [sMASK], sop, eop; pad = unk (0), eos = 2.

    Inputs with special tokens start with `[gMASK] sop`; batches are padded on the left and carry
    `position_ids` (0 for pads, 0..len-1 for real tokens) because the model reads them.
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"

    def __init__(self, vocab_file, padding_side="left", clean_up_tokenization_spaces=False, **kwargs):
        self.vocab_file = vocab_file
        self.sp_model = SentencePieceProcessor(model_file=str(vocab_file))
        n = self.sp_model.vocab_size()
        self.special_ids = {name: n + i for i, name in enumerate(GLM_SPECIALS)}
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
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp_model.vocab_size() + len(GLM_SPECIALS)

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
        kept = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in self._silent_ids]
        text = self.convert_tokens_to_string(self.convert_ids_to_tokens(kept))
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

    def save_vocabulary(self, save_directory, filename_prefix=None):
        """Writes the SentencePiece model as `tokenizer.model` (from memory: the source file may be gone)."""
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        path = os.path.join(save_directory, name) if os.path.isdir(save_directory) else save_directory
        with open(path, "wb") as f:
            f.write(self.sp_model.serialized_model_proto())
        return (path,)
