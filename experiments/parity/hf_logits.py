"""Reference logits from the transformers implementation (run with a Python that has torch and
transformers; marjax is not imported). Usage: python hf_logits.py GGUF_PATH OUT.npz"""
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf_path, out = sys.argv[1], sys.argv[2]
folder, name = gguf_path.rsplit("/", 1)
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
prompt = "Once upon a time"
ids = tok(prompt, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits[0].numpy()
    gen = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].numpy()
np.savez(out, ids=ids[0].numpy(), logits=logits, greedy=gen)
print("ids", ids[0].tolist(), "greedy", tok.decode(gen))
