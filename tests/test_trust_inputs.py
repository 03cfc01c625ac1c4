"""Inputs that used to end in a traceback, an out-of-memory kill or a file cut in half now end in ONE line
(``litliger: error: <what>, in <file or flag>; <what to do>``, exit status 1) and leave nothing half-written:

- a chat template that raises (``{{ 1/0 }}``) or that would render gigabytes (``{{ 'a' * 10**9 }}``);
- ``litliger chat`` with stdin closed (``<&-``), or a line of stdin that is not UTF-8;
- ``litliger evaluate --out_file`` naming a folder, a path below a file, or something not a regular file: refused
  before the model is loaded, and the JSON is written whole or not at all;
- a JSON Lines record that is not UTF-8 (file and line named), and records holding U+2028 and the like, which
  are one record each (lines are split at "\\n" only; also in metrics.jsonl and the docstrings corpus).

The CLI scenarios run as real ``litliger`` processes, started together (each spends seconds importing).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from test_bad_input import Files
from test_finetune import REPO

import litliger.eval.evaluate
import litliger.util.files
from litliger.cli import main
from litliger.data.docstrings import file_records
from litliger.data.instructions import read_records
from litliger.data.prompts import ChatTemplate, _GenerationBlock, _raise_exception, _tojson
from litliger.engine.metrics import MetricsLog

# --- the CLI scenarios ---------------------------------------------------------------------------------------


def with_template(files: Files, name: str, template: str) -> Path:
    """A copy of the tiny checkpoint whose tokenizer_config.json holds ``template`` as its chat template."""
    copy = files.root / name
    shutil.copytree(files.ckpt, copy)
    config = copy / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": template}))
    (copy / "checksums.json").unlink(missing_ok=True)  # edited on purpose: nothing to verify it against
    return copy


def scenarios(files: Files) -> dict[str, dict]:
    """id -> the command line, its stdin (None: closed), and what its one error line must say."""
    root = files.root
    (root / "a_folder").mkdir()
    (root / "bad_utf8.jsonl").write_bytes(
        b'{"instruction": "alpha", "output": "beta"}\n{"instruction": "gamma", "output": "delta \xff"}\n'
    )
    div = with_template(files, "template_div", "{{ 1/0 }}")
    bomb = with_template(files, "template_bomb", "{{ 'a' * 10**9 }}")
    chat = ["chat", "--device", "cpu", "--max_new_tokens", "2"]
    evaluate = ["evaluate", str(files.ckpt), "--device", "cpu", "--max_seq_length", "16"]
    return {
        "template-raises": dict(
            argv=[*chat, str(div)],
            stdin="alpha\n",
            expected=rf"^the chat template failed \(template line 1: ZeroDivisionError: division by zero\), "
            rf"in {re.escape(str(div / 'tokenizer_config.json'))}; fix the template",
        ),
        "template-bomb": dict(
            argv=[*chat, str(bomb)],
            stdin="alpha\n",
            expected=r"^the chat template renders too much \(template line 1: str \* 1000000000 would be "
            rf"1,000,000,000 characters, more than the limit of [\d,]+\), "
            rf"in {re.escape(str(bomb / 'tokenizer_config.json'))}; fix the template",
        ),
        "chat-stdin-closed": dict(
            argv=[*chat, str(files.ckpt)],
            stdin=None,
            expected=r"^stdin is closed, in litliger chat; pipe messages in or run it in a terminal$",
        ),
        "evaluate-out_file-folder": dict(
            argv=[*evaluate, "--out_file", str(root / "a_folder")],
            stdin="",
            expected=rf"^{re.escape(str(root / 'a_folder'))} is a folder, in --out_file; give the path of a file",
        ),
        "jsonl-not-utf8": dict(
            argv=[*evaluate, "--data", "litliger.data.Instructions", "--data.json_path", str(root / "bad_utf8.jsonl")],
            stdin="",
            expected=r"^not UTF-8 text \(byte 0xff at position 43 of the line: invalid start byte\), "
            rf"in {re.escape(str(root / 'bad_utf8.jsonl'))}:2; save the file as UTF-8$",
        ),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    return Files(tmp_path_factory.mktemp("trust_inputs"))


@pytest.fixture(scope="module")
def cli_runs(files: Files) -> dict[str, tuple[subprocess.CompletedProcess, str, float]]:
    """Every scenario's finished process, its expected line and its seconds: all started at once, then waited for."""
    table = scenarios(files)
    env = {k: v for k, v in os.environ.items() if k != "LITLIGER_DEBUG"}
    env["LITLIGER_CACHE"] = str(files.root / "cache")
    started = {}
    for name, s in table.items():
        if s["stdin"] is None:  # as a shell runs `litliger chat CKPT <&-`: no fd 0 at all
            argv = ["sh", "-c", 'exec "$0" -m litliger "$@" <&-', sys.executable, *s["argv"]]
        else:
            argv = [sys.executable, "-m", "litliger", *s["argv"]]
        stdin = subprocess.DEVNULL if s["stdin"] is None else subprocess.PIPE
        process = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd=REPO, env=env)  # fmt: skip
        started[name] = (process, time.perf_counter())
    runs = {}
    for name, (process, start) in started.items():
        out, err = process.communicate(table[name]["stdin"], timeout=300)
        result = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        runs[name] = (result, table[name]["expected"], time.perf_counter() - start)
    return runs


def assert_one_error_line(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("litliger: error: "), lines[0]
    assert re.search(expected, lines[0].removeprefix("litliger: error: ")), lines[0]


@pytest.mark.parametrize(
    "name", ["template-raises", "template-bomb", "chat-stdin-closed", "evaluate-out_file-folder", "jsonl-not-utf8"]
)
def test_cli_scenario_is_one_line(cli_runs, files, name):
    result, expected, seconds = cli_runs[name]
    assert_one_error_line(result, expected)
    assert result.stdout == ""  # no reply, no JSON: the command stopped before any output
    assert seconds < 120, f"{name} took {seconds:.0f} s"
    assert list((files.root / "a_folder").iterdir()) == []  # the folder given as --out_file is as it was
    assert not [p.name for p in files.root.iterdir() if p.name.startswith(".")]  # no temporary file left anywhere


# --- chat templates: any failure names the file; rendering is bounded; real templates render as before --------

BOMBS = {
    "{{ 'a' * 10**9 }}": r"str \* 1000000000 would be",
    "{{ [['x' * 1000000]] * 1000 }}": r"list \* 1000 would be",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}": "~ concat",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}": r"str \+ str",
    "{{ 10 ** 100000000 }}": "an integer would have more than",
    "{{ 'a' | center(1000000000) }}": "center filter",
    "{{ 'a'.ljust(1000000000) }}": r"str\.ljust\(\)",
    "{{ '{:>1000000000}'.format('a') }}": r"str\.format\(\)",
    "{{ '%1000000000s' % 'a' }}": "% formatting",
    "{% set s = 'a' * 1000000 %}{{ s | replace('a', s) }}": "replace filter",
    "{% set s = 'a' * 1000000 %}{{ s.replace('a', s) }}": r"str\.replace\(\)",
    "{% set s = 'a' * 500000 %}{{ [s, s, s, s] | join }}": "join filter",
    "{% set s = 'a\n' * 400000 %}{{ s | indent(s) }}": "indent filter",
    "{{ range(10) | list | tojson(indent=1000000) }}": "tojson filter",
    "{{ lipsum(1000000) }}": r"lipsum\(\)",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}": "loops run more than",
    "{% for i in range(100000) %}{% for j in range(100) %}xxxxxxxxxxxxxxxx{% endfor %}{% endfor %}": "rendered text",
    "{% macro m() %}{% for i in range(100000) %}{{ 'a' * 1000000 }}{% endfor %}{% endmacro %}{{ m() }}": "builds",
    "{% set s = 'a' * 1000000 %}{{ s }}{{ s }}": "the rendered text would be",
}


@pytest.mark.parametrize(("template", "what"), list(BOMBS.items()), ids=[f"bomb{i}" for i in range(len(BOMBS))])
def test_a_template_that_would_render_too_much_is_refused_before_it_does(template, what, tmp_path):
    source = str(tmp_path / "tokenizer_config.json")
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"^the chat template renders too much \((template line \d+: )?") as e:
        ChatTemplate(template, {}, source).render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert re.search(what, str(e.value)), str(e.value)
    assert str(e.value).endswith(f"), in {source}; fix the template, or use prompt_style=alpaca")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    ("template", "what"),
    [
        ("line one\n{{ 1/0 }}", r"failed \(template line 2: ZeroDivisionError: division by zero\)"),
        ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", r"failed \(template line 1: RecursionError: "),
        ("{{ messages + 1 }}", r"failed \(template line 1: TypeError: "),
        ("{{ [].append(1) }}", r"did what the sandbox forbids \(template line 1: access to attribute 'append'"),
        ("{% if %}", r"is not valid Jinja \(template line 1: "),
    ],
)
def test_any_failure_of_a_template_names_its_file(template, what, tmp_path):
    source = str(tmp_path / "chat_template.jinja")
    with pytest.raises(ValueError, match=what) as e:
        ChatTemplate(template, {}, source).render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert str(e.value).endswith(f", in {source}; fix the template, or use prompt_style=alpaca")
    assert "\n" not in str(e.value)


# Written for this test, using what real templates use: namespace, reversed and filtered loops, loop variables,
# string methods, slicing, tojson with indent, %-formatting, str.format, join, replace, center, macros, ~.
FEATURES = """{%- set ns = namespace(last_user=-1, seen=0) %}
{%- for m in messages[::-1] if m.role == 'user' %}
    {%- if ns.last_user < 0 %}{% set ns.last_user = loop.index0 %}{% endif %}
{%- endfor %}
{%- macro header(role) %}<|{{ role }}|>{{ '%-9s' % role }}{% endmacro %}
{{- bos_token }}
{%- for m in messages %}
    {%- set ns.seen = ns.seen + 1 %}
    {{- header(m.role) ~ '{:>3}'.format(loop.index) ~ '/' ~ loop.length }}
    {%- if m.role == 'assistant' and '</think>' in m.content %}
        {{- m.content.split('</think>')[-1].lstrip('\\n') | trim }}
    {%- else %}
        {{- m.content.strip() | replace('\\r', '') }}
    {%- endif %}
    {{- ' ' + (m | tojson(indent=2)) | length | string + ' ' + m.role | center(11) + eos_token + '\\n' }}
{%- endfor %}
{{- messages | map(attribute='role') | join(',') }} {{ ns.seen }} {{ ns.last_user }}
{%- if add_generation_prompt %}<|assistant|>{% endif %}"""

CONVERSATIONS = {
    "short": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?\r\n"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4."},
        {"role": "user", "content": 'And 3 + 3? <tag> & "quotes" é \u2028'},
    ],
    "long": [{"role": "user", "content": "word " * 300_000}, {"role": "assistant", "content": "ok " * 300_000}] * 2,
    "many": [{"role": r, "content": f"message {i}"} for i in range(2000) for r in ("user", "assistant")],
}


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_real_templates_render_exactly_as_in_jinja2s_sandbox(conversation):
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    messages = CONVERSATIONS[conversation]
    for gen in (False, True):
        expected = env.from_string(FEATURES).render(messages=messages, add_generation_prompt=gen, **tokens)
        assert ChatTemplate(FEATURES, tokens, "x").render(messages, add_generation_prompt=gen) == expected
    if conversation == "long":  # the limit grows with the conversation: 2.4 M characters in, more than 1 MiB out
        assert len(expected) > 2_400_000


# --- litliger chat: stdin that cannot be read ------------------------------------------------------------------


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # what Python picks depends on the locale
def test_chat_refuses_a_line_that_is_not_utf8(files, monkeypatch, capsys, errors):
    monkeypatch.delenv("LITLIGER_DEBUG", raising=False)
    stdin = io.TextIOWrapper(io.BytesIO(b"alpha\n\xff beta\n"), encoding="utf-8", errors=errors)
    monkeypatch.setattr(sys, "stdin", stdin)
    with pytest.raises(SystemExit) as exit_info:
        main(["chat", str(files.ckpt), "--device", "cpu", "--max_new_tokens", "1"])
    assert exit_info.value.code == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert re.match(r"^litliger: error: line 2 is not valid UTF-8 text \(.*\), in litliger chat's stdin; ", last)


# --- litliger evaluate --out_file: checked first, written whole ------------------------------------------------


@pytest.mark.parametrize(
    ("out_file", "expected"),
    [
        ("{tmp}/afile/eval.json", r"^{tmp}/afile is a file, not a folder, in --out_file {tmp}/afile/eval\.json; "),
        ("{tmp}/afile/sub/eval.json", r"^{tmp}/afile is a file, not a folder, in --out_file {tmp}/afile/sub/"),
        (os.devnull, r"^/dev/null is not a regular file, in --out_file; give the path of a file"),
    ],
    ids=["below-a-file", "deep-below-a-file", "not-a-regular-file"],
)
def test_evaluate_checks_out_file_before_loading_the_model(out_file, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LITLIGER_DEBUG", raising=False)
    (tmp_path / "afile").write_text("a file, not a folder")
    out_file, expected = out_file.format(tmp=tmp_path), expected.format(tmp=re.escape(str(tmp_path)))
    monkeypatch.setattr(litliger.eval.evaluate, "load_for_inference", lambda *a: pytest.fail("loaded the model first"))
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(tmp_path / "ckpt"), "--out_file", str(out_file)])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("litliger: error: "), lines
    assert re.search(expected, lines[0].removeprefix("litliger: error: ")), lines[0]


def test_out_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    out = tmp_path / "eval.json"
    out.write_text("the previous results\n")
    link = tmp_path / "latest.json"
    link.symlink_to(out)

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(litliger.util.files.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        litliger.eval.evaluate.write_atomically(out, '{"loss": 1.0}\n')
    assert out.read_text() == "the previous results\n"  # untouched, and no temporary file left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "latest.json"]
    monkeypatch.undo()
    litliger.eval.evaluate.write_atomically(link, '{"loss": 1.0}\n')  # through the link, which stays a link
    assert out.read_text() == '{"loss": 1.0}\n' and link.is_symlink()
    litliger.eval.evaluate.write_atomically(tmp_path / "new" / "dir" / "e.json", "{}\n")
    mode = (tmp_path / "new" / "dir" / "e.json").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # as a plain write would have made it


# --- JSON Lines: records split at "\n" only, bad bytes named by file and line ----------------------------------


def test_a_record_holding_line_separators_is_one_record(tmp_path):
    texts = ["one\u2028two", "three\u2029four", "five\x85six", "seven\x0b\x0c\x1ceight"]
    lines = [json.dumps({"instruction": t, "output": t[::-1]}, ensure_ascii=False) for t in texts[:3]]
    lines.append(json.dumps({"instruction": texts[3], "output": "x"}))  # control characters are escaped in JSON
    path = tmp_path / "records.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n\r\n")  # a BOM, CRLF, a blank line
    records = read_records(path)
    assert [r.messages[0]["content"] for r in records] == texts
    assert [r.messages[1]["content"] for r in records[:3]] == [t[::-1] for t in texts[:3]]
    assert [r.where for r in records] == [f"{path}:{n}" for n in (1, 2, 3, 4)]


def test_a_json_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "records.json"
    path.write_bytes(b'[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "\xc3(", "output": "d"}\n]\n')
    where = re.escape(str(path))
    with pytest.raises(
        ValueError, match=rf"^not UTF-8 text \(byte 0xc3 at position 20 of the line: .*\), in {where}:3; "
    ):
        read_records(path)


def test_metrics_jsonl_keeps_its_lines_whole_on_resume(tmp_path):
    lines = [
        json.dumps({"step": 1, "note": "a\u2028b"}, ensure_ascii=False).encode(),
        b'{"step": 2, "loss": 1.5}',
        b'{"step": 3, "loss": \xff}',  # not UTF-8: dropped like a line cut short
        b'{"step": 4, "loss": 1.2}',
        b'{"step": 5, "lo',  # cut short by a kill
    ]
    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    MetricsLog(SimpleNamespace(global_rank=0), tmp_path, keep_through=4)
    assert (tmp_path / "metrics.jsonl").read_bytes() == lines[0] + b"\n" + lines[1] + b"\n" + lines[3] + b"\n"


def test_docstring_records_survive_a_form_feed_in_the_source():
    source = 'x = 1\n\x0c\ndef add(a, b):\n    """Add a and b."""\n    return a + b\n'
    records = list(file_records(source, max_response_chars=1000, max_docstring_chars=1000))
    assert [r["output"] for r in records] == ["def add(a, b):\n    return a + b"]
