"""Chat templates rendered from the checkpoint's own Jinja template, identical to transformers'
apply_chat_template (golden renderings made once by tests/io/make_chat_goldens.py), and
assistant-only masks derived from the rendering, on a Llama-3 conversation."""
import json
from pathlib import Path

import numpy as np
import pytest

from marjax.errors import MarjaxError
from marjax.io.tokenizer import ChatTemplate, load_tokenizer_dir
from marjax.train.data import tokenize_documents

DATA = Path(__file__).parents[1] / "data" / "chat_templates"
FAMILIES = ("chatml_smollm2", "llama32", "gemma2", "mistral")


def _golden(name):
    return json.loads((DATA / f"{name}.json").read_text())


@pytest.mark.parametrize("name", FAMILIES)
def test_renderings_match_transformers(name):
    g = _golden(name)
    tmpl = ChatTemplate(g["template"], g["special_tokens"], name)
    assert len(g["cases"]) >= 2
    for case in g["cases"]:
        got = tmpl.render(case["messages"], case["add_generation_prompt"], **case["kwargs"])
        assert got == case["text"], (name, case["messages"], case["add_generation_prompt"])


def test_template_errors_are_marjax_errors():
    g = _golden("gemma2")
    tmpl = ChatTemplate(g["template"], g["special_tokens"], "gemma2")
    with pytest.raises(MarjaxError, match="System role not supported"):
        tmpl.render([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    with pytest.raises(MarjaxError, match="alternate"):
        tmpl.render([{"role": "user", "content": "u"}, {"role": "user", "content": "u"}])


def test_smollm2_gguf_ships_the_chatml_template(smollm2_tokenizer):
    """The GGUF teacher's template (tokenizer.chat_template) is the fixture's, and renders as transformers."""
    g = _golden("chatml_smollm2")
    tok = smollm2_tokenizer
    assert tok.chat_template == g["template"]
    for case in g["cases"]:
        assert tok.apply_chat_template(case["messages"], case["add_generation_prompt"]) == case["text"]


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    """A byte-level BPE with Llama 3's special tokens and split regex, and the Llama 3.2 template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from marjax.io.tokenizer import PRETOKENIZER_REGEX
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZER_REGEX["llama-bpe"][1]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=LLAMA3_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [c["text"] for c in _golden("llama32")["cases"]] * 10
    tk.train_from_iterator(text, trainer)
    d = tmp_path_factory.mktemp("llama3tok")
    tk.save(str(d / "tokenizer.json"))
    g = _golden("llama32")
    json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": g["template"]},
              open(d / "tokenizer_config.json", "w"))
    return d


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "Six, I think."}]


def test_llama3_assistant_mask_from_rendering(llama3_dir):
    tok = load_tokenizer_dir(str(llama3_dir))
    kw = {"date_string": "26 Jul 2024"}
    text = tok.apply_chat_template(CHAT, **kw)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system") and "<|im_start|>" not in text
    ids, mask = tok.encode_chat(CHAT, **kw)
    assert ids == tok.encode(text, add_special=False)          # the whole rendering, tokenised once
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id   # the template's BOS, no second one
    mask = np.asarray(mask)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Four.<|eot_id|>Six, I think.<|eot_id|>"
    # two contiguous runs: each reply and its end-of-turn marker, never the assistant header
    assert np.count_nonzero(np.diff(np.r_[0, mask, 0]) == 1) == 2
    hdr = tok.token_to_id("<|start_header_id|>")
    assert all(m == 0 for i, m in zip(ids, mask) if i == hdr)
    # the training data path (mask='assistant') uses exactly these ids and bits
    d_ids, bits = tokenize_documents([CHAT], tok, "assistant")
    today_ids, today_mask = tok.encode_chat(CHAT)                 # data renders with today's date
    np.testing.assert_array_equal(d_ids, today_ids + [tok.eos_id])
    np.testing.assert_array_equal(bits, today_mask + [0])
    # with a generation prompt the header of the next reply is not masked in
    g_ids, g_mask = tok.encode_chat(CHAT[:4], add_generation_prompt=True, **kw)
    assert tok.decode(g_ids).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") and g_mask[-1] == 0


def test_mask_needs_a_prefix_stable_template():
    """Phi-3's template appends eos only when no generation prompt follows: a reply's prefix
    rendering is not a prefix of the whole chat, so masks cannot be derived; say so."""
    phi3 = ("{% for message in messages %}{{'<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n'}}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
    t = ChatTemplate(phi3, {"eos_token": "<|endoftext|>"}, "phi3")
    with pytest.raises(MarjaxError, match="prefix-stable"):
        t.assistant_spans(CHAT[1:])
