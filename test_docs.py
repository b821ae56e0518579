"""Claims about the docs and the headline command's start-up, checked offline in a few seconds:

- every relative link in README.md, CHANGELOG.md and docs/*.md resolves: the file exists and its #anchor is a
  heading there (GitHub's anchor rules);
- every --flag shown in a command line of minillm.py, eval.py, bench.py, demo.py or toy_gaussian.py in those files
  (but the changelog's history) exists in that script's --help (the parsers are built in this process, so flags added later are seen);
- offline (HF_HUB_OFFLINE=1), hub names that are not cached are named together in one line that points to
  demo.py, before anything is loaded or written, and never with the advice to set HF_HUB_OFFLINE=1; a local folder
  passes; an unreachable hub is asked once, not once per name and retry;
- a stage that would take days on the CPU is announced with an estimate, from the configs alone;
- the README's line numbers of the method are the markers' in minillm.py.
"""

import contextlib
import io
import os
import re
import shlex
import sys
import unicodedata
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import huggingface_hub
import pytest
from transformers import GPT2Config

import minillm as M
from test_minillm import tiny_gpt2, word_tokenizer, write_jsonl

ROOT = Path(__file__).resolve().parent
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ["minillm.py", "eval.py", "bench.py", "demo.py", "toy_gaussian.py"]


# ---------------------------------------------------------------------------------------------------
# Markdown: fenced code apart from prose, headings -> GitHub anchors, links, command lines

def split_fences(text):
    """(prose with code blocks blanked out, [code block text])."""
    prose, blocks, block = [], [], None
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            if block is None:
                block = []
            else:
                blocks.append("\n".join(block))
                block = None
            prose.append("")
        elif block is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def anchor(heading):
    """GitHub's heading id: markup dropped, lower case, punctuation and symbols removed, spaces -> hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = "".join(c for c in text.lower() if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return text.replace(" ", "-")


def anchors(path):
    seen, out = {}, set()
    for line in split_fences(path.read_text())[0].split("\n"):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            a = anchor(m.group(1))
            out.add(a if a not in seen else f"{a}-{seen[a]}")  # GitHub numbers repeated headings
            seen[a] = seen.get(a, 0) + 1
    return out


def links(path):
    prose = re.sub(r"`[^`\n]*`", "", split_fences(path.read_text())[0])  # inline code holds no links
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose)


def commands(path):
    """(script, [--flags]) of every command line that runs one of SCRIPTS: in code blocks (shell variables set in
    the block are expanded, continuation lines joined) and in inline code."""
    prose, blocks = split_fences(path.read_text())
    lines = [line for b in blocks for line in b.replace("\\\n", " ").split("\n")]
    lines += re.findall(r"`([^`\n]*\.py[^`\n]*)`", prose)
    found, env = [], {}
    for line in lines:
        line = re.sub(r"(^|\s)#.*", "", line)  # a comment
        m = re.match(r'\s*(\w+)="([^"]*)"\s*$', line)
        if m:
            env[m.group(1)] = m.group(2)
            continue
        line = re.sub(r"\$(\w+)", lambda v: env.get(v.group(1), ""), line)
        for command in re.split(r"&&|\|\||[;|&]", line):
            try:
                words = shlex.split(command)
            except ValueError:
                words = command.split()
            for i, w in enumerate(words):
                if Path(w).name in SCRIPTS:
                    found.append((Path(w).name, [x.split("=")[0] for x in words[i + 1:] if re.match(r"--[a-z]", x)]))
                    break
    return found


def script_flags(script):
    """Every option string of the script's parser: build_parser() where there is one, else its --help."""
    module = __import__(script[:-3])
    if hasattr(module, "build_parser"):
        return set(module.build_parser()._option_string_actions)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.parse_args(["--help"])
    return set(re.findall(r"(?<![\w-])--[a-z][\w-]*", out.getvalue()))


def test_every_relative_link_resolves():
    """Files exist, #anchors are headings of the target (or of this file); web links are not fetched."""
    bad = []
    for doc in DOCS:
        for target in links(doc):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, frag = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            if not dest.exists():
                bad.append(f"{doc.name}: {target} (no such file)")
            elif frag and (dest.suffix != ".md" or frag not in anchors(dest)):
                bad.append(f"{doc.name}: {target} (no such heading)")
    assert len(DOCS) > 5 and not bad, bad


def test_every_flag_shown_in_a_command_exists():
    """The changelog is left out: it shows the flags of past releases (`python minillm.py --demo`)."""
    cmds = [(doc.name, script, flags) for doc in DOCS if doc.name != "CHANGELOG.md" for script, flags in commands(doc)]
    known = {s: script_flags(s) for s in SCRIPTS}
    bad = [f"{doc}: {script} {flag}" for doc, script, flags in cmds for flag in flags if flag not in known[script]]
    assert len(cmds) > 30 and {s for _, s, _ in cmds} == set(SCRIPTS), cmds  # the parser above finds the commands
    assert not bad, bad


def test_the_readme_gives_the_method_s_lines_and_they_stay_under_650():
    """The README's "lines A–B" are the THE METHOD and END OF THE METHOD markers' lines, and the stretch between them
    stays within the 650 lines the method was given."""
    a, b = map(int, re.search(r"\*\*lines (\d+)–(\d+)\*\*", (ROOT / "README.md").read_text()).groups())
    lines = (ROOT / "minillm.py").read_text().splitlines()
    marks = [i + 1 for i, line in enumerate(lines) if re.match(r"# =+ (END OF )?THE METHOD =+$", line)]
    assert marks == [a, b] and b - a <= 650, (marks, a, b)


def test_the_checks_find_what_is_broken(tmp_path):
    """The two checks above would see a broken link, a missing heading and an unknown flag."""
    (tmp_path / "a.md").write_text("# Top: `--x`\n\n[ok](#top---x) [no](b.md) [bad](#nope)\n\n"
                                   "```bash\nA=\"--alpha 0\"\npython minillm.py $A \\\n  --no-such-flag 1  # --comment\n```\n")
    assert links(tmp_path / "a.md") == ["#top---x", "b.md", "#nope"] and "top---x" in anchors(tmp_path / "a.md")
    assert commands(tmp_path / "a.md") == [("minillm.py", ["--alpha", "--no-such-flag"])]
    assert "--alpha" in script_flags("minillm.py") and "--no-such-flag" not in script_flags("minillm.py")
    assert "--quick" in script_flags("demo.py") and "--json" in script_flags("toy_gaussian.py")


# ---------------------------------------------------------------------------------------------------
# The headline command without the hub

@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    tok = word_tokenizer()
    tiny_gpt2(len(tok), 0, n_layer=1).save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    GPT2Config(n_layer=48, n_embd=1600, n_head=25, vocab_size=len(tok)).save_pretrained(root / "xl")  # gpt2-xl's blocks
    tok.save_pretrained(root / "xl")  # a config and a tokenizer, no weights: nothing may load them
    write_jsonl(root / "data.jsonl")
    return root


def fails(argv, capsys):
    with pytest.raises(SystemExit) as e:
        M.main(argv)
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_offline_names_every_missing_hub_name_at_once(local, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    names = ["no-such-org/teacher-1b", "no-such-org/student-100m", "no-such-org/dolly", "no-such-org/webtext"]
    out = tmp_path / "run"
    err = fails(["--teacher", names[0], "--student", names[1], "--data", names[2], "--pt-data", names[3],
                 "--device", "cpu", "--out", str(out)], capsys)
    assert all(f"'{n}'" in err for n in names) and "python demo.py" in err and "hf download" in err, err
    assert "HF_HUB_OFFLINE=1" not in err and "unset HF_HUB_OFFLINE" in err, err
    assert not out.exists()
    # a local folder passes: only the hub names left are listed (and L_PT off: its corpus is not needed)
    err = fails(["--teacher", names[0], "--student", str(local / "tiny"), "--data", str(local / "data.jsonl"),
                 "--pt-data", "none", "--device", "cpu", "--out", str(out)], capsys)
    assert f"'{names[0]}'" in err and "tiny" not in err and "data.jsonl" not in err and names[3] not in err, err


def test_an_unreachable_hub_is_asked_once(local, tmp_path, monkeypatch, capsys):
    """Without HF_HUB_OFFLINE and without a network: one request, no retries, every name listed; when everything
    needed is cached the run goes on reading the cache alone, as HF_HUB_OFFLINE=1 would."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    asked = []

    def no_network(self, name, **kw):
        asked.append(name)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", no_network)
    err = fails(["--teacher", "no-such-org/t", "--student", "no-such-org/s", "--data", str(local / "data.jsonl"),
                 "--device", "cpu", "--out", str(tmp_path / "run")], capsys)
    assert asked == ["no-such-org/t"] and "'no-such-org/s'" in err and "cannot be reached" in err, err
    assert "HF_HUB_OFFLINE=1" not in err and "python demo.py" in err, err
    monkeypatch.setattr(M, "in_hub_cache", lambda name, kind: True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    if "datasets" in sys.modules:  # read_cache_only switches it too: restored after the test
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_HUB_OFFLINE", sys.modules["datasets"].config.HF_HUB_OFFLINE)
    args = M.parse_args(["--teacher", "org/t", "--student", "org/s", "--data", "org/d", "--device", "cpu"])
    M.check_hub_names(args)
    assert "reading it alone" in capsys.readouterr().out and huggingface_hub.constants.HF_HUB_OFFLINE is True


def test_a_stage_that_takes_days_on_the_cpu_is_announced(local, tmp_path, monkeypatch, capsys):
    """gpt2-xl's blocks (1.48 B parameters with a tiny vocabulary) as teacher on the CPU: teacher SFT and MiniLLM get a line with the parameter count and an
    estimate; the tiny student's SFT does not; tiny models alone are not even built on the meta device."""
    train = [([1, 2, 3], [4, 5])] * 100
    args = M.parse_args(["--teacher", str(local / "xl"), "--student", str(local / "tiny"), "--device", "cpu",
                         "--out", str(tmp_path)])
    M.warn_slow_stages(args, train)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["teacher-sft", "minillm"], lines
    assert all(line.startswith("warning:") and "(1.48 B parameters)" in line and "GFLOP/s" in line for line in lines), lines
    monkeypatch.setattr(M, "n_params", lambda *a: pytest.fail("tiny models need no meta-device build"))
    args.teacher = str(local / "tiny")
    M.warn_slow_stages(args, train)
    assert capsys.readouterr().out == ""
