"""Training data: read documents, tokenise, pack into fixed-length sequences, shuffle, shard,
batch, with a checkpointable iterator (Grain `MapDataset`).

    docs = load_documents("data.jsonl", text_field="text")      # None: the embedded corpus
    it = make_dataset(docs, tokenizer, seq_len=128, batch_size=8, seed=0)
    batch = next(it)        # {"inputs": int32 (b, l), "targets": int32 (b, l), "mask": float32 (b, l)}
    state = it.get_state()  # JSON-able; it.set_state(state) on a fresh iterator resumes exactly

Documents
  A document is a string (plain text) or a chat: a list of {"role", "content"} dicts.
  .txt / .md / other files: one document per file (`txt_split="blank_lines"` splits on blank
  lines instead). .jsonl: one JSON object per line; .json: a list of such objects (or one).
  Objects with "conversations" (ShareGPT / OpenHermes: [{"from": human|gpt|system, "value"}])
  or "messages" ([{"role", "content"}]) are chats; others must have the `text_field` string.
  A directory means all such files under it, in sorted path order.
  The last `heldout_fraction` of the characters (a document tail, cut at a line break where
  possible) is held out: `load_documents` never returns it, `heldout_text` returns only it.

Tokens and packing
  Tokenizer: encode(text) (called with add_special=False when it takes that argument), eos_id,
  bos_id, add_bos, apply_chat_template(messages, add_generation_prompt) (marjax.io.tokenizer).
  Each document becomes [bos if tokenizer.add_bos] + tokens + [eos]; all documents (in order)
  form one token stream of N tokens. Sequence w is the window stream[w*l : w*l + l + 1]:
  inputs = window[:-1], targets = window[1:]. Windows overlap by one token, so every adjacent
  pair of the stream is a training pair exactly once per epoch and the inputs of the windows, in
  order, concatenate to the stream. The last window is padded (with eos, mask 0). mask[b, j]
  belongs to targets[b, j].
  mask="assistant" trains only on assistant replies: a chat is rendered message by message
  with the tokenizer's chat template -- render(messages[:i+1]) minus render(messages[:i]) is the
  text of message i; for an assistant message, render(messages[:i], add_generation_prompt=True)
  splits off its header ("<|im_start|>assistant\\n"), and the rest (content, end-of-turn marker)
  gets mask 1. Each piece is tokenised separately, which equals tokenising the whole rendering
  when pieces meet at special tokens or line breaks (true for ChatML templates). The separator
  eos gets mask 0 in that mode.
  The stream is built in memory up front (fine up to ~1e8 tokens).

Order, sharding, epochs
  All shards see one order: the windows shuffled with `seed`, reshuffled every epoch (Grain's
  shuffle-then-repeat), cut into batches of `batch_size` (a batch may span an epoch boundary;
  with a finite `num_epochs` the last partial batch is dropped); shard s of S takes batches
  s, s+S, s+2S, ... (the same count on every shard, so all processes run the same number of
  steps). So the S shards' k-th batches, stacked in shard order, are exactly batch k of one
  shard with batch_size * S: a job on S processes trains on the same global batches as one
  process does, and every shard's iterator state (its position) is the same.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import grain
import numpy as np

from marjax.errors import ConfigError, DataError
from marjax.io.jsonl import jsonl_records, parse_json
from marjax.train import corpus
import jax

__all__ = ["load_documents", "heldout_text", "split_heldout", "tokenize_documents", "make_dataset",
           "PackedBatches", "Document", "TEXT_SUFFIXES", "JSON_SUFFIXES"]

Document = Union[str, list]          # plain text, or a chat: [{"role": ..., "content": ...}, ...]

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system", "tool": "tool"}


# ----------------------------------------------------------------------------- reading

def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from e
    if not raw.strip():
        raise DataError(f"data file {path} is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"data file {path} is not UTF-8: invalid byte 0x{raw[e.start]:02x} at byte offset "
                        f"{e.start} (line {line}; {e.reason})") from e
    return text.removeprefix("\ufeff")


def _chat_from(turns: Any, where: str, key: str, role_key: str, content_key: str) -> list:
    if not isinstance(turns, list):
        raise DataError(f"{where}: field {key!r} must be a list of messages, got {type(turns).__name__}")
    msgs = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or role_key not in t or content_key not in t:
            raise DataError(f"{where}: {key}[{j}] must be an object with {role_key!r} and {content_key!r}, got {t!r:.80}")
        role, content = t[role_key], t[content_key]
        if role not in _ROLES:
            raise DataError(f"{where}: {key}[{j}] has unknown role {role!r}; known: {sorted(_ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {key}[{j}].{content_key} must be a string, got {type(content).__name__}")
        msgs.append({"role": _ROLES[role], "content": content})
    return msgs


def _doc_from_record(obj: Any, where: str, text_field: str) -> Optional[Document]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "conversations" in obj:
        doc = _chat_from(obj["conversations"], where, "conversations", "from", "value")
    elif "messages" in obj:
        doc = _chat_from(obj["messages"], where, "messages", "role", "content")
    elif text_field in obj:
        doc = obj[text_field]
        if not isinstance(doc, str):
            raise DataError(f"{where}: field {text_field!r} must be a string, got {type(doc).__name__}")
    else:
        raise DataError(f"{where}: no field {text_field!r} (nor 'conversations'/'messages'); the record has "
                        f"keys {sorted(obj)[:10]}; pick the text field with --text-field / text_field=")
    return doc or None                      # empty text / empty chat: skipped


def _read_json_docs(path: Path, text_field: str) -> list:
    text = _read_utf8(path)
    docs = []
    if path.suffix == ".jsonl":
        docs = [_doc_from_record(obj, f"{path}:{lineno}", text_field) for lineno, obj in jsonl_records(text, path)]
    else:
        obj = parse_json(text, path)
        records = obj if isinstance(obj, list) else [obj]
        docs = [_doc_from_record(r, f"{path}[{i}]", text_field) for i, r in enumerate(records)]
    return [d for d in docs if d is not None]


def _read_text_docs(path: Path, txt_split: str) -> list:
    text = _read_utf8(path)
    if txt_split == "file":
        return [text]
    paras, cur = [], []
    for line in text.split("\n"):
        if line.strip():
            cur.append(line)
        elif cur:
            paras.append("\n".join(cur))
            cur = []
    if cur:
        paras.append("\n".join(cur))
    return paras


def _files(path: Path) -> list:
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + JSON_SUFFIXES)
    if not files:
        raise DataError(f"data directory {path} has no {'/'.join(TEXT_SUFFIXES + JSON_SUFFIXES)} files")
    return files


def _doc_chars(doc: Document) -> int:
    return len(doc) if isinstance(doc, str) else sum(len(m["content"]) for m in doc)


def split_heldout(docs: Sequence[Document], fraction: float) -> tuple[list, list]:
    """(train, heldout): the last `fraction` of the characters go to heldout. A text document
    that straddles the cut is split at the line break nearest to it (a chat goes whole). The
    train part is never emptied."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in [0, 1), got {fraction}")
    docs = list(docs)
    need = int(round(fraction * sum(_doc_chars(d) for d in docs)))
    held = []
    while need > 0 and docs:
        d = docs[-1]
        n = _doc_chars(d)
        if n <= need:
            if len(docs) == 1:
                if isinstance(d, str):      # keep some of the last document for training
                    need = min(need, n // 2)
                    continue
                break
            held.insert(0, docs.pop())
            need -= n
            continue
        if isinstance(d, str):
            cut = len(d) - need
            nl = d.rfind("\n", 0, cut + 1)
            nr = d.find("\n", cut)
            cands = [c for c in (nl, nr) if 0 < c < len(d)]
            if cands:
                cut = min(cands, key=lambda c: abs(c - (len(d) - need)))
            docs[-1], tail = d[:cut], d[cut:].lstrip("\n")
            if tail:
                held.insert(0, tail)
        elif len(docs) > 1:
            held.insert(0, docs.pop())
        break
    return docs, held


def _load_all(path, text_field: str, txt_split: str) -> list:
    if txt_split not in ("file", "blank_lines"):
        raise ConfigError(f"txt_split must be 'file' or 'blank_lines', got {txt_split!r}")
    if path is None or path == "":
        return corpus.default_documents()
    docs = []
    for f in _files(Path(path)):
        docs.extend(_read_json_docs(f, text_field) if f.suffix in JSON_SUFFIXES else _read_text_docs(f, txt_split))
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"data path {path} holds no non-empty documents")
    return docs


def load_documents(path: Optional[Union[str, Path]] = None, *, text_field: str = "text",
                   txt_split: str = "file", heldout_fraction: float = 0.02) -> list:
    """Training documents from a file or directory (None or "": the embedded corpus), without
    the held-out tail (see `heldout_text`)."""
    return split_heldout(_load_all(path, text_field, txt_split), heldout_fraction)[0]


def heldout_text(path: Optional[Union[str, Path]] = None, *, text_field: str = "text", txt_split: str = "file",
                 heldout_fraction: float = 0.02, tokenizer: Any = None) -> str:
    """The held-out tail that `load_documents` (same arguments) leaves out, as one string.
    Chats are rendered with `tokenizer.apply_chat_template` when a tokenizer is given, else as
    "role: content" lines."""
    held = split_heldout(_load_all(path, text_field, txt_split), heldout_fraction)[1]
    if not held:
        raise DataError(f"no held-out text: data {path or 'embedded corpus'} is too small for heldout_fraction "
                        f"{heldout_fraction}")

    def render(d):
        if isinstance(d, str):
            return d
        if tokenizer is not None:
            return tokenizer.apply_chat_template(d, add_generation_prompt=False)
        return "\n".join(f"{m['role']}: {m['content']}" for m in d)
    return "\n\n".join(render(d) for d in held)


# ----------------------------------------------------------------------------- tokenising

def _encoder(tokenizer):
    """encode(text) without special tokens: marjax tokenizers prepend BOS unless
    add_special=False; a plain encode(text) is taken to add nothing. BOS is placed here, once
    per document, never per chat piece."""
    try:
        params = inspect.signature(tokenizer.encode).parameters
    except (TypeError, ValueError):
        params = {}
    if "add_special" in params:
        return lambda text: list(tokenizer.encode(text, add_special=False)) if text else []
    return lambda text: list(tokenizer.encode(text)) if text else []


def _chat_pieces(tokenizer, msgs: list) -> list:
    """[(text, is_assistant_reply)] whose concatenation is the rendered chat (see module doc)."""
    tmpl = tokenizer.apply_chat_template
    pieces, prev = [], ""
    for i, m in enumerate(msgs):
        full = tmpl(msgs[:i + 1], add_generation_prompt=False)
        if not full.startswith(prev):
            raise DataError("mask='assistant' needs a prefix-stable chat template (rendering messages[:i+1] "
                            "must extend the rendering of messages[:i]); this tokenizer's is not")
        if m["role"] == "assistant":
            gen = tmpl(msgs[:i], add_generation_prompt=True) if i else prev
            if gen.startswith(prev) and full.startswith(gen):
                pieces += [(gen[len(prev):], False), (full[len(gen):], True)]
            else:
                pieces.append((full[len(prev):], True))
        else:
            pieces.append((full[len(prev):], False))
        prev = full
    return pieces


def tokenize_documents(docs: Iterable[Document], tokenizer, mask: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """The packed token stream (int32 (N,)) and per-token loss bits (uint8 (N,))."""
    if mask not in ("all", "assistant"):
        raise ConfigError(f"mask must be 'all' or 'assistant', got {mask!r}")
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        raise ConfigError("the tokenizer has no eos_id; packing separates documents with eos")
    bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None else []
    encode = _encoder(tokenizer)
    ids, bits = [], []
    for i, d in enumerate(docs):
        if isinstance(d, str):
            if mask == "assistant":
                raise DataError(f"mask='assistant' needs chat documents, but document {i} is plain text "
                                f"({d[:40]!r}...); use mask='all'")
            toks = bos + encode(d)
            ids += toks
            bits += [1] * len(toks)
        elif hasattr(tokenizer, "encode_chat"):   # marjax tokenizers: ids and reply mask from the rendering
            toks, on = tokenizer.encode_chat(d)
            pre = bos if toks[:1] != bos else []  # templates that render BOS themselves (Llama 3) get no second
            ids += pre + toks
            bits += [int(mask == "all")] * len(pre) + ([1] * len(toks) if mask == "all" else list(on))
        elif mask == "all":
            toks = bos + encode(tokenizer.apply_chat_template(d, add_generation_prompt=False))
            ids += toks
            bits += [1] * len(toks)
        else:
            ids += bos
            bits += [0] * len(bos)
            for text, on in _chat_pieces(tokenizer, d):
                toks = encode(text)
                ids += toks
                bits += [int(on)] * len(toks)
        ids.append(eos)
        bits.append(1 if mask == "all" else 0)
    return np.asarray(ids, np.int32), np.asarray(bits, np.uint8)


# ----------------------------------------------------------------------------- dataset

@dataclass(frozen=True)
class _Windows:
    """Window w of the stream -> one packed example (called by Grain's map)."""
    ids: np.ndarray
    bits: np.ndarray
    seq_len: int
    pad_id: int

    def __call__(self, w: int) -> dict:
        l = self.seq_len
        start = int(w) * l
        seg = self.ids[start:start + l + 1]
        n = len(seg) - 1
        inputs = np.full((l,), self.pad_id, np.int32)
        targets = np.full((l,), self.pad_id, np.int32)
        mask = np.zeros((l,), np.float32)
        inputs[:n], targets[:n] = seg[:-1], seg[1:]
        mask[:n] = self.bits[start + 1:start + 1 + n]
        return {"inputs": inputs, "targets": targets, "mask": mask}


class PackedBatches(grain.DatasetIterator):
    """A Grain `DatasetIterator` over packed batches. `get_state()` is a JSON-able dict (Grain's
    orbax handler and `json.dumps` take it); `set_state` refuses a state from a different
    dataset (token count, seq_len, batch size, seed or shard) instead of silently misaligning.
    Attributes: n_tokens, n_sequences (per shard per epoch), batches_per_epoch."""

    def __init__(self, parent: grain.DatasetIterator, fingerprint: dict, n_tokens: int, n_sequences: int,
                 batch_size: int):
        super().__init__(parent)
        self._fingerprint = fingerprint
        self.n_tokens, self.n_sequences = n_tokens, n_sequences
        self.batches_per_epoch = n_sequences // batch_size

    def __next__(self) -> dict:
        return next(self._parent)

    def get_state(self) -> dict:
        return {"grain": self._parent.get_state(), "dataset": dict(self._fingerprint)}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or "grain" not in state or "dataset" not in state:
            raise DataError(f"not a marjax data iterator state: {state!r:.200}")
        # the shard index is not compared: every shard walks the same order (module doc), so the
        # state one process saved (Orbax writes it from process 0) resumes every shard
        saved = {k: v for k, v in dict(state["dataset"]).items() if k != "shard_index"}
        if saved != {k: v for k, v in self._fingerprint.items() if k != "shard_index"}:
            diff = {k: (state["dataset"].get(k), v) for k, v in self._fingerprint.items()
                    if state["dataset"].get(k) != v and k != "shard_index"}
            raise DataError(f"data iterator state is from a different dataset; (saved, current): {diff}")
        self._parent.set_state(state["grain"])


def make_dataset(source: Union[None, str, Path, Sequence[Document]], tokenizer, seq_len: int, batch_size: int,
                 seed: int = 0, *, mask: str = "all", shard_index: Optional[int] = None,
                 shard_count: Optional[int] = None, num_epochs: Optional[int] = None, shuffle: bool = True,
                 max_seq_len: Optional[int] = None, text_field: str = "text") -> PackedBatches:
    """Packed, shuffled, sharded batches {"inputs", "targets": int32 (b, l), "mask": float32 (b, l)}.

    source: documents (from `load_documents`), or a path / None (then loaded with
    `load_documents(source, text_field=text_field)`). Shards default to this JAX process
    (jax.process_index() of jax.process_count()). num_epochs None: repeat forever.
    """
    if max_seq_len is not None and seq_len > max_seq_len:
        raise DataError(f"seq_len {seq_len} exceeds max_seq_len {max_seq_len}")
    if seq_len < 1 or batch_size < 1:
        raise ConfigError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ConfigError(f"num_epochs must be None or >= 1, got {num_epochs}")
    if shard_index is None or shard_count is None:
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ConfigError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    docs = load_documents(source, text_field=text_field) if source is None or isinstance(source, (str, Path)) \
        else list(source)
    if not docs:
        raise DataError("no documents to train on")
    ids, bits = tokenize_documents(docs, tokenizer, mask)
    n_windows = -(-(len(ids) - 1) // seq_len) if len(ids) > 1 else 0
    per_shard = n_windows // shard_count
    if per_shard < batch_size:
        need = (batch_size * shard_count - 1) * seq_len + 2
        raise DataError(f"corpus too small: {len(ids)} tokens make {n_windows} sequences of seq_len {seq_len}, but one "
                        f"batch of {batch_size} on each of {shard_count} shard(s) needs {batch_size * shard_count} "
                        f"sequences, i.e. at least {need} tokens")
    if mask == "assistant" and not bits.any():
        raise DataError("mask='assistant' but the documents contain no assistant tokens")

    windows = _Windows(ids, bits if mask == "assistant" else np.ones_like(bits), seq_len, int(tokenizer.eos_id))
    ds = grain.MapDataset.range(n_windows)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map(windows).batch(batch_size, drop_remainder=True)
    if shard_count > 1:
        if num_epochs is not None:    # an equal number of batches on every shard
            ds = ds[:len(ds) // shard_count * shard_count]
        ds = ds[shard_index::shard_count]
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
    fingerprint = {"n_tokens": int(len(ids)), "seq_len": seq_len, "batch_size": batch_size, "seed": int(seed),
                   "shuffle": bool(shuffle), "mask": mask, "shard_index": int(shard_index),
                   "shard_count": int(shard_count)}
    return PackedBatches(it, fingerprint, len(ids), per_shard, batch_size)
