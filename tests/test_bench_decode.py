"""`marjax bench decode` on the tiny preset: cached and full-forward greedy decoding agree."""
import json

from marjax.cli import main


def test_bench_decode_tiny(tmp_path, capsys):
    out = tmp_path / "d.json"
    assert main(["bench", "decode", "--model", "tiny", "--new-tokens", "6", "--curve", "16,64",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["decode"][0]["same_tokens"] is True
    kv, ssm = res["curve"]["kv"], res["curve"]["ssm"]
    assert kv[1]["cache_bytes"] > kv[0]["cache_bytes"]          # KV cache grows with context
    assert ssm[1]["cache_bytes"] == ssm[0]["cache_bytes"]        # SSM state does not
