"""The demo (demo.py) runs offline end to end and shows the method working."""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_quick_demo_lowers_the_held_out_reverse_kl(tmp_path):
    """The shortened demo runs offline end to end, and MiniLLM ends with a lower reverse KL(q||p) on held-out
    prompts (measured on the student's own samples) than the SFT student it started from."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    res = subprocess.run([sys.executable, str(HERE / "demo.py"), "--quick", "--out", str(tmp_path / "demo")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    assert set(rows) == {"teacher", "SFT", "KD", "SeqKD", "MiniLLM"}
    assert all(0 <= r["rouge_l"] <= 100 for r in rows.values())
    assert rows["MiniLLM"]["reverse_kl"] < rows["SFT"]["reverse_kl"]
    assert (tmp_path / "demo" / "minillm" / "reverse_kl.png").exists()
    assert "| MiniLLM |" in res.stdout
