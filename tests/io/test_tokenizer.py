"""Tokenizers: the real SmolLM2 GGUF vocabulary, a tokenizer.json built with the `tokenizers`
package (the oracle for our GGUF-metadata path), the byte tokenizer, chat templates and
streaming detokenisation."""
import json

import pytest

from marjax.errors import CheckpointError, MarjaxError
from marjax.io.tokenizer import (ByteTokenizer, ChatTemplate, StreamDecoder, from_gguf_fields,
                                 from_tokenizer_json, load_tokenizer_dir)

TEXTS = ["Hello world!", "Once upon a time, there were 12345 numbers and 3.14159 pies.",
         "héllo wörld — naïve café; 日本語のテキスト; Ελληνικά; русский",
         "emoji 🤖🎉👩‍👩‍👧 and flags 🇫🇷", "def f(x):\n    return x ** 2  # square\n\n\n\tindented\r\n",
         "  leading and trailing   ", "", "'s 're 've I'm you'll we'd", "a\u00a0b\u200bc"]


# --------------------------------------------------------------------------- real SmolLM2
def test_smollm2_known_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    # "Once"=6403, " upon"=1980, " a"=253, " time"=655 in SmolLM2's vocabulary
    assert tok.encode("Once upon a time") == [6403, 1980, 253, 655]
    assert [tok.id_to_token(i) for i in (6403, 1980, 253, 655)] == ["Once", "Ġupon", "Ġa", "Ġtime"]
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size, tok.pre) == (1, 2, False, 49152, "smollm")
    assert tok.stop_ids[0] == 2 and tok.token_to_id("<|im_end|>") in tok.stop_ids
    # StarCoder-style pre-tokenizer: every digit is its own piece
    assert len(tok.encode("12345")) == 5 and tok.decode(tok.encode(" 2024")) == " 2024"
    assert tok.encode("<|im_start|>user") == [1, 4093]


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_round_trip(smollm2_tokenizer, text):
    assert smollm2_tokenizer.decode(smollm2_tokenizer.encode(text)) == text


def test_smollm2_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    msgs = [{"role": "user", "content": "Hi there"}]
    s = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert s == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    s2 = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Yo"}])
    assert s2 == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nYo<|im_end|>\n"
    ids = tok.encode(s)
    assert ids[0] == 1 and ids.count(2) == 2 and tok.decode(ids) == s


def test_smollm2_stream_decoding(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "Stream: 日本 🤖🎉 done."
    ids = tok.encode(text)
    dec = tok.decode_stream()
    pieces = [dec.put(i) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)


# --------------------------------------------------------------------------- tokenizer.json
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small byte-level BPE trained with `tokenizers`, saved as tokenizer.json + config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [t * 3 for t in TEXTS] + ["the quick brown fox jumps over the lazy dog " * 5] * 20
    tk.train_from_iterator(corpus, trainer)
    d = tmp_path_factory.mktemp("tokjson")
    tk.save(str(d / "tokenizer.json"))
    template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                "{% endif %}")
    json.dump({"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": True,
               "chat_template": template}, open(d / "tokenizer_config.json", "w"))
    return d, tk


def test_tokenizer_json_matches_backend(trained):
    d, tk = trained
    tok = load_tokenizer_dir(str(d))
    assert tok.bos_id == tk.token_to_id("<|im_start|>") and tok.eos_id == tk.token_to_id("<|im_end|>")
    assert tok.add_bos and tok.chat.source == tok.chat_template
    for t in TEXTS:
        ids = tok.encode(t)
        assert ids == [tok.bos_id] + tk.encode(t, add_special_tokens=False).ids
        assert tok.decode(ids[1:]) == t and tok.encode(t, add_special=False) == ids[1:]
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], True) == \
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_gguf_metadata_tokenizer_matches_tokenizers_oracle(trained):
    """Our GGUF path (vocab + merges + token types -> BPE) against the original tokenizer."""
    d, tk = trained
    tok = from_tokenizer_json(str(d / "tokenizer.json"), str(d / "tokenizer_config.json"))
    tokens, merges = tok.bpe_vocab_and_merges()
    special = tok.special_ids()
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.merges": merges, "tokenizer.ggml.token_type": [3 if i in special else 1
                                                                               for i in range(len(tokens))],
              "tokenizer.ggml.bos_token_id": tok.bos_id, "tokenizer.ggml.eos_token_id": tok.eos_id,
              "tokenizer.ggml.add_bos_token": False}
    g = from_gguf_fields(fields)
    assert not g.add_bos and g.vocab_size == tk.get_vocab_size()
    for t in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert g.encode(t) == tk.encode(t, add_special_tokens=False).ids
        assert g.decode(g.encode(t)) == t


def test_gguf_tokenizer_survives_save_gguf(tmp_path, trained):
    import dataclasses

    from marjax.io.gguf import load_gguf, save_gguf
    import jax

    from marjax.config import preset
    from marjax.models.lm import init_params
    d, tk = trained
    tok = load_tokenizer_dir(str(d))
    assert tok.pre == "smollm"   # inferred from tokenizer.json's Digits + ByteLevel
    cfg = dataclasses.replace(preset("tiny"), vocab_size=tk.get_vocab_size())
    params = init_params(jax.random.PRNGKey(0), cfg)
    p = str(tmp_path / "t.gguf")
    save_gguf(p, cfg, params, tok)
    _, _, tok2 = load_gguf(p)
    assert (tok2.bos_id, tok2.eos_id, tok2.add_bos) == (tok.bos_id, tok.eos_id, True)
    for t in TEXTS:
        assert tok2.encode(t, add_special=False) == tk.encode(t, add_special_tokens=False).ids
    assert tok2.chat_template == tok.chat_template and tok2.pre == "smollm"


def test_tokenizer_json_errors(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{nope")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        from_tokenizer_json(str(bad))
    assert load_tokenizer_dir(str(tmp_path / "nothing")) is None


def test_unsupported_gguf_tokenizer_warns():
    with pytest.warns(UserWarning, match="not supported"):
        assert from_gguf_fields({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]}) is None
    with pytest.raises(CheckpointError, match="merges"):
        from_gguf_fields({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]})


# --------------------------------------------------------------------------- bytes
def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256 and tok.eos_id == 255 and not tok.add_bos
    for t in TEXTS:
        ids = tok.encode(t)
        assert ids == list(t.encode("utf-8")) and tok.decode(ids) == t
    # the special ids are bytes that never occur in UTF-8, so text cannot collide with them
    every = "".join(chr(c) for c in range(0, 0x10FFFF, 97) if not 0xD800 <= c < 0xE000)
    assert max(tok.encode(every)) < 0xF5
    s = "<|im_start|>user\nhé<|im_end|>\n"
    assert tok.encode(s) == [254, *b"user\n", *"hé".encode(), 253, 10] and tok.decode(tok.encode(s)) == s
    assert tok.decode(tok.encode(s), skip_special=True) == "user\nhé\n"
    assert ByteTokenizer(add_bos=True).encode("a") == [255, 97]
    assert set(tok.stop_ids) == {255, 253}
    with pytest.raises(MarjaxError, match="out of range"):
        tok.decode([300])
    with pytest.raises(MarjaxError, match="expects a str"):
        tok.encode(b"bytes")


def test_byte_stream_holds_incomplete_utf8():
    tok = ByteTokenizer()
    dec = tok.decode_stream()
    out = [dec.put(b) for b in "a🤖b".encode()]
    assert out == ["a", "", "", "", "🤖", "b"]
    dec2 = StreamDecoder(tok)
    assert dec2.put(list("é".encode())[:1]) == "" and dec2.flush() == "\ufffd"
    assert dec.step(10) == "\n" and dec.text == "a🤖b\n"


# --------------------------------------------------------------------------- chat templates
def test_chat_template_is_rendered_not_guessed():
    """A non-ChatML template renders as itself (the old renderer turned everything into ChatML);
    a jinja-escaped newline in a literal is a newline; errors name the problem."""
    t = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nBe nice.<|im_end|>\\n' }}{% endif %}"
         "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}")
    assert ChatTemplate(t).render([{"role": "user", "content": "q"}]) == \
        "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
    llama3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] }}<|eot_id|>{% endfor %}")
    plain = ChatTemplate(llama3, {"bos_token": "<|begin_of_text|>"})
    got = plain.render([{"role": "user", "content": "q"}], True)
    assert got == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nq<|eot_id|>"
    assert "<|im_start|>" not in got
    with pytest.raises(MarjaxError, match="role"):
        plain.render([{"content": "no role"}])
    with pytest.raises(MarjaxError, match="list"):
        plain.render("just a string")
    with pytest.raises(MarjaxError, match="no chat template"):
        ChatTemplate(None, name="x").render([{"role": "user", "content": "q"}])
    with pytest.raises(MarjaxError, match="alternate"):
        ChatTemplate("{{ raise_exception('roles must alternate') }}").render([])
    with pytest.raises(MarjaxError, match="does not compile"):
        ChatTemplate("{% for %}").render([])


def test_chat_template_sandbox():
    """Templates run in jinja's immutable sandbox: no reaching Python internals, no mutation."""
    for evil in ("{{ messages.__class__.__mro__ }}", "{{ ''.__class__.__subclasses__() }}",
                 "{{ messages.append(1) }}", "{{ cycler.__init__.__globals__ }}"):
        with pytest.raises(MarjaxError):
            out = ChatTemplate(evil).render([{"role": "user", "content": "q"}])
            assert "class" not in out and "builtins" not in out   # sandbox renders unsafe attrs as undefined
            raise MarjaxError("rendered without access")
    assert ChatTemplate("{{ {'a': '<b>'} | tojson }}").render([]) == '{"a": "<b>"}'   # transformers' tojson
