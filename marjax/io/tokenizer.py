"""Tokenizers with one interface: byte-level BPE (from GGUF metadata or a tokenizer.json, run by
the `tokenizers` package) and a dependency-free `ByteTokenizer` for the tiny presets and tests.

    tok.encode("text")            -> list[int]   (BOS prepended only when tok.add_bos)
    tok.decode(ids)               -> str
    tok.apply_chat_template(msgs, add_generation_prompt=True) -> str
    tok.encode_chat(msgs)         -> (ids, assistant_mask)
    tok.stop_ids                  -> ids that end a generation (eos, <|im_end|>, <|eot_id|>, ...)
    s = tok.decode_stream(); s.put(id) -> new text (holds back incomplete UTF-8); s.flush()

Chat templates are the checkpoint's own Jinja template (tokenizer_config.json `chat_template`,
chat_template.jinja, or GGUF `tokenizer.chat_template`), rendered with jinja2 in the same
immutable sandbox, globals and filters as transformers' apply_chat_template. A tokenizer without
a template refuses chat rendering; the byte tokenizer's own template is ChatML.
"""
from __future__ import annotations

import functools
import json
import os
import re
from datetime import datetime
from typing import Iterable, Optional, Sequence

import jinja2.ext
import jinja2.utils
from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from marjax.errors import CheckpointError, MarjaxError
from tokenizers import Regex, pre_tokenizers
import warnings
from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as HFTokenizer

__all__ = ["Tokenizer", "ByteTokenizer", "StreamDecoder", "ChatTemplate", "CHATML_TEMPLATE", "from_gguf_fields",
           "from_tokenizer_json", "load_tokenizer_dir", "PRETOKENIZER_REGEX"]

# Split regexes of llama.cpp's pre-tokenizer types (llama-vocab.cpp), applied before byte-level BPE.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# pre name -> (split digits one by one first, regex). "smollm" is StarCoder's: digits split
# individually, then the GPT-2 regex (SmolLM2's tokenizer.json: Digits + ByteLevel).
PRETOKENIZER_REGEX = {
    "default": (False, _GPT2), "gpt2": (False, _GPT2), "gpt-2": (False, _GPT2),
    "smollm": (True, _GPT2), "starcoder": (True, _GPT2), "refact": (True, _GPT2),
    "codeshell": (True, _GPT2), "command-r": (True, _GPT2),
    "llama-bpe": (False, _LLAMA3), "llama3": (False, _LLAMA3), "smaug-bpe": (False, _LLAMA3),
    "qwen2": (False, _QWEN2),
}

_STOP_NAMES = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "<|end|>")

# The byte tokenizer's own template (it has <|im_start|>/<|im_end|>): plain ChatML.
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
                   "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _chatml_with_default_system(system: str) -> str:
    """ChatML that injects `system` when the first message is not a system message (SmolLM2's form)."""
    lit = json.dumps(system)   # a JSON string literal is a valid jinja string literal
    return ("{% if messages and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n' + " + lit
            + " + '<|im_end|>\\n' }}{% endif %}" + CHATML_TEMPLATE)


class _GenerationTracker(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` tag (it marks assistant text for
    return_assistant_tokens_mask): rendered as its body, so such templates compile and render;
    marjax derives assistant masks from prefix renderings instead (ChatTemplate.assistant_spans)."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' override: no HTML escaping (jinja's own tojson escapes <, >, &, ')
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without handing them the dict type itself (as transformers)."""
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace() refusing underscore names (no reaching CPython internals), as transformers."""
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store underscore-prefixed attributes ({name!r})")


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _plain(value):
    """A JSON-typed copy of template input: templates see only plain data, never caller objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _template_messages(messages) -> list:
    """transformers' normalisation: None-valued keys dropped, reasoning copied under its aliases."""
    out = []
    for m in messages:
        m = _plain({k: v for k, v in m.items() if v is not None})
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


@functools.lru_cache(maxsize=32)
def _compile(source: str):
    """The template in the environment transformers' apply_chat_template uses: an immutable
    sandbox (no attribute access to Python internals, no mutation of the passed messages),
    trim_blocks/lstrip_blocks, loop controls, raise_exception/strftime_now, its tojson."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


class ChatTemplate:
    """A checkpoint's Jinja chat template, rendered as transformers' apply_chat_template does.

    ChatTemplate(source, special_tokens, name): `source` is the template text (None: none, and
    render raises); `special_tokens` ({"bos_token": "<s>", ...}) are template variables, as
    transformers passes its special-tokens map. ChatTemplate(default_system="...") is ChatML with
    that system prompt injected (the byte tokenizer's template with SmolLM2's behaviour)."""

    def __init__(self, source: Optional[str] = None, special_tokens: Optional[dict] = None, name: str = "",
                 *, default_system: Optional[str] = None):
        if default_system is not None:
            source = _chatml_with_default_system(default_system)
        if source is not None and not isinstance(source, str):
            raise CheckpointError(f"{name or 'chat template'}: chat_template must be a string, "
                                  f"got {type(source).__name__}")
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.name = name

    @classmethod
    def from_jinja(cls, template: Optional[str], special_tokens: Optional[dict] = None, name: str = ""):
        return cls(template, special_tokens, name)

    def _template(self):
        if self.source is None:
            raise MarjaxError(f"{self.name or 'this tokenizer'} has no chat template (no chat_template in "
                              "tokenizer_config.json / tokenizer.chat_template in the GGUF); use plain text")
        try:
            return _compile(self.source)
        except TemplateError as e:
            raise MarjaxError(f"{self.name or 'chat template'}: the chat template does not compile ({e})") from None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """The rendered conversation. Extra keyword arguments become template variables (e.g.
        date_string for Llama 3's template, which otherwise prints today's date)."""
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            raise MarjaxError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or "role" not in msg:
                raise MarjaxError(f"messages[{i}] must be a dict with 'role' and 'content', got {msg!r}")
        tmpl = self._template()
        ctx = {**self.special_tokens, **_plain(kwargs), "messages": _template_messages(messages),
               "add_generation_prompt": bool(add_generation_prompt)}
        ctx.setdefault("tools", None)
        ctx.setdefault("documents", None)
        try:
            return tmpl.render(**ctx)
        except TemplateError as e:   # raise_exception(...) from the template, sandbox violations
            raise MarjaxError(f"{self.name or 'chat template'}: chat template {type(e).__name__}: {e}") from None
        except RecursionError:
            raise MarjaxError(f"{self.name or 'chat template'}: the chat template recursed too deeply") from None

    def assistant_spans(self, messages: Sequence[dict], **kwargs) -> tuple[str, list]:
        """(rendering, [(start, end)]) character spans of the assistant replies in the rendering
        of the whole chat: reply i is render(messages[:i+1]) minus render(messages[:i],
        add_generation_prompt=True), i.e. its content and end-of-turn marker, not its header."""
        full = self.render(messages, False, **kwargs)
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            head = self.render(messages[:i], True, **kwargs) if i else ""
            upto = self.render(messages[:i + 1], False, **kwargs)
            if not (upto.startswith(head) and full.startswith(upto)):
                raise MarjaxError(f"{self.name or 'chat template'}: assistant masks need a prefix-stable "
                                  f"template (the rendering up to message {i} must begin the whole chat's "
                                  "rendering, after the generation prompt); this one is not")
            if len(upto) > len(head):
                spans.append((len(head), len(upto)))
        return full, spans


class StreamDecoder:
    """Incremental detokenisation: `put(id)` returns only text that is final. Text is decoded
    over a sliding window of ids (so tokenizers whose pieces depend on their left context stay
    right) and held back while it ends in an incomplete UTF-8 sequence (U+FFFD)."""

    def __init__(self, tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip = skip_special
        self.ids: list[int] = []
        self._prefix = 0   # window start
        self._read = 0     # ids up to here have been emitted
        self.text = ""

    def _dec(self, ids):
        return self._tok.decode(ids, skip_special=self._skip)

    def put(self, token_id) -> str:
        ids = [int(token_id)] if not isinstance(token_id, Iterable) else [int(t) for t in token_id]
        self.ids.extend(ids)
        prefix_text = self._dec(self.ids[self._prefix:self._read])
        new_text = self._dec(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += delta
            return delta
        return ""

    step = put  # alias: one generated id in, final text out

    def flush(self) -> str:
        """Whatever is still held back (an incomplete sequence decodes to U+FFFD)."""
        prefix_text = self._dec(self.ids[self._prefix:self._read])
        delta = self._dec(self.ids[self._prefix:])[len(prefix_text):]
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta


class _Base:
    bos_id: Optional[int]
    eos_id: Optional[int]
    add_bos: bool
    chat: ChatTemplate

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """The checkpoint's chat template rendered as transformers' apply_chat_template(...,
        tokenize=False); kwargs become template variables."""
        return self.chat.render(messages, add_generation_prompt, **kwargs)

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False, *,
                    add_special: bool = False, **kwargs) -> tuple[list, list]:
        """(ids, assistant_mask) of the rendered chat, tokenised like transformers'
        apply_chat_template(tokenize=True): the template places BOS itself, nothing is added
        (add_special=True: BOS is prepended when add_bos and the rendering lacks it).
        mask[j] = 1 for the tokens of assistant replies (content and end-of-turn marker, see
        ChatTemplate.assistant_spans); a token counts as assistant when it starts inside a reply."""
        if add_generation_prompt:
            text = self.chat.render(messages, True, **kwargs)
            _, spans = self.chat.assistant_spans(messages, **kwargs)
        else:
            text, spans = self.chat.assistant_spans(messages, **kwargs)
        ids, starts = self._encode_with_starts(text)
        mask = [int(any(a <= st < b for a, b in spans)) for st in starts]
        if add_special and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids, mask = [self.bos_id] + ids, [0] + mask
        return ids, mask

    @property
    def stop_ids(self) -> list[int]:
        ids = [] if self.eos_id is None else [self.eos_id]
        for name in _STOP_NAMES:
            i = self.token_to_id(name)
            if i is not None and i not in ids:
                ids.append(i)
        return ids

    def decode_stream(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    def _check_ids(self, ids) -> list[int]:
        out = [int(i) for i in ids]
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise MarjaxError(f"token ids out of range [0, {self.vocab_size}): {bad[:8]}")
        return out

    def __call__(self, text: str, add_special: bool = True) -> list[int]:
        return self.encode(text, add_special)


class Tokenizer(_Base):
    """A `tokenizers.Tokenizer` plus what marjax needs around it (BOS policy, stops, chat)."""

    def __init__(self, backend, *, bos_id: Optional[int], eos_id: Optional[int], add_bos: bool,
                 chat_template: Optional[str] = None, pre: str = "", name: str = "",
                 special_tokens: Optional[dict] = None, template_source: Optional[str] = None):
        self.backend = backend
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, bool(add_bos)
        self.chat_template = chat_template
        self.pre = pre
        self.name = name
        toks = {"bos_token": None if bos_id is None else backend.id_to_token(bos_id),
                "eos_token": None if eos_id is None else backend.id_to_token(eos_id)}
        toks.update({k: v for k, v in (special_tokens or {}).items() if v is not None})
        self.chat = ChatTemplate(chat_template, toks, template_source or name)

    def _encode_with_starts(self, text: str) -> tuple[list, list]:
        enc = self.backend.encode(text, add_special_tokens=False)
        return list(enc.ids), [a for a, _ in enc.offsets]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise MarjaxError(f"encode expects a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.backend.decode(self._check_ids(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self.backend.id_to_token(int(i))

    def bpe_vocab_and_merges(self) -> tuple[list[str], list[str]]:
        """Token strings by id and merges as 'a b' strings (what GGUF stores)."""
        model = json.loads(self.backend.to_str())["model"]
        if model.get("type") != "BPE":
            raise MarjaxError(f"only BPE tokenizers can be exported to GGUF, this one is {model.get('type')!r}")
        n = self.vocab_size
        tokens = [self.backend.id_to_token(i) for i in range(n)]
        if any(t is None for t in tokens):
            raise MarjaxError("tokenizer ids are not contiguous; cannot export a token list")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        return tokens, merges

    def special_ids(self) -> set[int]:
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def save_dir(self, path: str) -> None:
        """tokenizer.json + tokenizer_config.json (the HF layout load_tokenizer_dir reads)."""
        self.backend.save(os.path.join(path, "tokenizer.json"))
        cfg = {"add_bos_token": self.add_bos,
               "bos_token": None if self.bos_id is None else self.id_to_token(self.bos_id),
               "eos_token": None if self.eos_id is None else self.id_to_token(self.eos_id),
               "chat_template": self.chat_template, "tokenizer_class": "PreTrainedTokenizerFast"}
        if self.pre:
            cfg["marjax_pre"] = self.pre
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=1, ensure_ascii=False)

    def __repr__(self) -> str:
        return (f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, add_bos={self.add_bos})")


class ByteTokenizer(_Base):
    """UTF-8 bytes as ids 0..255. The special tokens live on byte values that never occur in
    valid UTF-8 (0xF5..0xFF), so the vocabulary stays 256 and fits the tiny presets:
    255 <|endoftext|> (bos/eos), 254 <|im_start|>, 253 <|im_end|>, 252 <|pad|>."""

    SPECIALS = {"<|endoftext|>": 255, "<|im_start|>": 254, "<|im_end|>": 253, "<|pad|>": 252}

    def __init__(self, add_bos: bool = False):
        self.bos_id = self.eos_id = self.SPECIALS["<|endoftext|>"]
        self.pad_id = self.SPECIALS["<|pad|>"]
        self.add_bos = bool(add_bos)
        self.chat_template = CHATML_TEMPLATE
        self.chat = ChatTemplate(CHATML_TEMPLATE, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
                                 "bytes")
        self.name = "bytes"
        self._by_id = {v: k for k, v in self.SPECIALS.items()}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.SPECIALS) + ")")

    vocab_size = 256

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise MarjaxError(f"encode expects a str, got {type(text).__name__}")
        ids = [self.bos_id] if add_special and self.add_bos else []
        for part in self._split.split(text):
            if part in self.SPECIALS:
                ids.append(self.SPECIALS[part])
            elif part:
                ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        out, buf = [], bytearray()
        for i in self._check_ids(ids):
            if i in self._by_id:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                if not skip_special:
                    out.append(self._by_id[i])
            else:
                buf.append(i)
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def _encode_with_starts(self, text: str) -> tuple[list, list]:
        ids, starts, pos = [], [], 0
        for part in self._split.split(text):
            if part in self.SPECIALS:
                ids.append(self.SPECIALS[part])
                starts.append(pos)
            else:
                for j, ch in enumerate(part):
                    b = ch.encode("utf-8")
                    ids.extend(b)
                    starts.extend([pos + j] * len(b))
            pos += len(part)
        return ids, starts

    def token_to_id(self, token: str) -> Optional[int]:
        if token in self.SPECIALS:
            return self.SPECIALS[token]
        b = token.encode("utf-8")
        return b[0] if len(b) == 1 else None

    def id_to_token(self, i: int) -> Optional[str]:
        i = int(i)
        return self._by_id.get(i, bytes([i]).decode("latin-1"))

    def special_ids(self) -> set[int]:
        return set(self.SPECIALS.values())

    def save_dir(self, path: str) -> None:
        with open(os.path.join(path, "marjax_tokenizer.json"), "w") as f:
            json.dump({"type": "bytes", "add_bos": self.add_bos}, f)

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size=256, add_bos={self.add_bos})"


def _byte_level_pretokenizer(pre: str):
    digits, regex = PRETOKENIZER_REGEX[pre]
    if regex == _GPT2:  # ByteLevel's built-in regex is exactly GPT-2's
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    else:
        steps = [pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    if digits:
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    return pre_tokenizers.Sequence(steps)


def from_gguf_fields(fields: dict, source: str = "<gguf>"):
    """Build the tokenizer from GGUF `tokenizer.ggml.*` metadata (values already decoded).
    Returns None (with a warning) for tokenizer models marjax does not implement."""


    kind = fields.get("tokenizer.ggml.model")
    if kind is None:   # a weights-only file
        return None
    if kind == "marjax-bytes":
        return ByteTokenizer(add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)))
    if kind != "gpt2":
        warnings.warn(f"{source}: tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2'); "
                      "loading weights without a tokenizer", stacklevel=3)
        return None
    tokens = fields.get("tokenizer.ggml.tokens")
    merges = fields.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise CheckpointError(f"{source}: GGUF tokenizer metadata lacks "
                              f"{'tokenizer.ggml.tokens' if not tokens else 'tokenizer.ggml.merges'}")
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in PRETOKENIZER_REGEX:
        warnings.warn(f"{source}: unknown pre-tokenizer {pre!r}; using GPT-2's split regex "
                      f"(known: {sorted(PRETOKENIZER_REGEX)})", stacklevel=3)
        pre = "default"
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise CheckpointError(f"{source}: malformed BPE merge {m!r} (expected 'left right')")
        pairs.append((a, b))
    tok = HFTokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _byte_level_pretokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    bos = fields.get("tokenizer.ggml.bos_token_id")
    eos = fields.get("tokenizer.ggml.eos_token_id")
    extra = {}
    for key in ("unk", "padding"):
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= int(i) < len(tokens):
            extra["unk_token" if key == "unk" else "pad_token"] = tokens[int(i)]
    for key in ("bos", "eos"):
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and not 0 <= int(i) < len(tokens):
            raise CheckpointError(f"{source}: tokenizer.ggml.{key}_token_id {int(i)} is outside the vocabulary "
                                  f"(0..{len(tokens) - 1})")
    template = fields.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{source}: tokenizer.chat_template must be a string, got {type(template).__name__}")
    return Tokenizer(tok, bos_id=None if bos is None else int(bos), eos_id=None if eos is None else int(eos),
                     add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
                     chat_template=template, pre=pre, name=source, special_tokens=extra)


def _token_content(t) -> Optional[str]:
    if isinstance(t, dict):
        t = t.get("content")
    return t if isinstance(t, str) else None


def _read_json_object(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            conf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(conf, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(conf).__name__}")
    return conf


def from_tokenizer_json(tokenizer_json: str, tokenizer_config: Optional[str] = None) -> Tokenizer:
    """A tokenizer.json (+ optional tokenizer_config.json for bos/eos/add_bos/chat_template)."""
    try:
        backend = HFTokenizer.from_file(tokenizer_json)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a bare Exception on bad JSON, pyo3's PanicException (a BaseException) on worse
        raise CheckpointError(f"{tokenizer_json}: not a readable tokenizer.json ({str(e)[:300]})") from None
    conf = {}
    if tokenizer_config and os.path.exists(tokenizer_config):
        conf = _read_json_object(tokenizer_config)
    special = {k: _token_content(conf.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    bos_tok, eos_tok = special["bos_token"], special["eos_token"]
    bos_id = None if bos_tok is None else backend.token_to_id(bos_tok)
    eos_id = None if eos_tok is None else backend.token_to_id(eos_tok)
    if "add_bos_token" in conf:
        add_bos = bool(conf["add_bos_token"])
    else:  # e.g. Llama 3: the post-processor adds BOS; detect it from its effect
        with_sp = backend.encode("a", add_special_tokens=True).ids
        without = backend.encode("a", add_special_tokens=False).ids
        add_bos = len(with_sp) > len(without) and bos_id is not None and with_sp[0] == bos_id
    template = conf.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    template_source = tokenizer_config
    if template is None:   # transformers 4.43+ may save it next to the config instead
        jinja = os.path.join(os.path.dirname(tokenizer_json), "chat_template.jinja")
        if os.path.exists(jinja):
            with open(jinja, encoding="utf-8", errors="replace") as f:
                template, template_source = f.read(), jinja
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{tokenizer_config}: chat_template must be a string, got {type(template).__name__}")
    pre = conf.get("marjax_pre")
    return Tokenizer(backend, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, chat_template=template,
                     pre=pre if isinstance(pre, str) and pre else _infer_pre(backend),
                     name=os.path.dirname(os.path.abspath(tokenizer_json)), special_tokens=special,
                     template_source=template_source)


def _infer_pre(backend) -> str:
    """The llama.cpp pre-tokenizer name matching a tokenizer.json's pre_tokenizer ('' if none
    matches): needed to export the tokenizer to GGUF faithfully."""
    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [st.get("type") for st in steps]
    digits = kinds[:1] == ["Digits"] and steps[0].get("individual_digits")
    rest = steps[1:] if digits else steps
    if [st.get("type") for st in rest] == ["ByteLevel"] and rest[0].get("use_regex", True):
        return "smollm" if digits else "gpt2"
    if not digits and [st.get("type") for st in rest] == ["Split", "ByteLevel"]:
        regex = (rest[0].get("pattern") or {}).get("Regex")
        for name in ("llama-bpe", "qwen2"):
            if regex == PRETOKENIZER_REGEX[name][1]:
                return name
    return ""


def load_tokenizer_dir(path: str):
    """The tokenizer saved next to a model (tokenizer.json or marjax_tokenizer.json), or None."""
    tj = os.path.join(path, "tokenizer.json")
    if os.path.exists(tj):
        return from_tokenizer_json(tj, os.path.join(path, "tokenizer_config.json"))
    mj = os.path.join(path, "marjax_tokenizer.json")
    if os.path.exists(mj):
        conf = _read_json_object(mj)
        if conf.get("type") != "bytes":
            raise CheckpointError(f"{mj}: unknown tokenizer type {conf.get('type')!r} (expected 'bytes')")
        return ByteTokenizer(add_bos=bool(conf.get("add_bos", False)))
    return None
