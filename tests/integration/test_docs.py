"""The docs run: every ```sh and ```python block of README.md and docs/*.md, in order, for real.

Shell blocks go through `bash -euo pipefail` in the story's working directory (the venv's `pointsx`
first on PATH); Python blocks run in one namespace per document, in that directory, with the SDK
against the hub the document itself started. A story is one or more documents sharing a working
directory and its hub: the merchant quickstart and then the protocol notes; the operator guide;
the README.

Conventions, as an HTML comment on the line right before a fence (invisible when rendered):

    <!-- not run: WHY -->   not run; still checked statically: every `pointsx …` command line
                            must parse with the CLI's own parser, Python must compile, its imports
                            must resolve and its calls on a MerchantClient must fit real methods
    <!-- background -->     a long-running `pointsx serve`: started, waited for until it prints
                            "pointsx hub serving on", and stopped with SIGTERM (it must exit 0)
                            when the next background block starts or the story ends
    <!-- config: PATH -->   a ```toml excerpt: each of its keys must already be in PATH (relative
                            to the working directory), where its value is set
    <!-- output -->         what the block above printed, compared line by line

A block in any other language, or a marker the test does not know, fails
`test_every_block_is_run_or_marked`, so no snippet slips by untested.

The docs say `127.0.0.1:50051` and `postgresql+psycopg://postgres@127.0.0.1:5432/pointsx`, as a
reader would type them; the test substitutes a free port and a fresh database for them.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from exchange import cli
from merchant_sdk import MerchantClient, errors
from tests import harness
from tests.integration.test_cli import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Each story's documents, run in order in one working directory. A document outside every story
# may hold only blocks marked not run.
MERCHANT_STORY = [ROOT / "docs" / "merchant-quickstart.md", ROOT / "docs" / "protocol.md"]
OPERATOR_STORY = [ROOT / "docs" / "operator-guide.md"]
README_STORY = [ROOT / "README.md"]
# README's hub is not started by a block of its own (its "Running a hub" lines are a reference, and
# its serve lines run until stopped), so its story begins as those lines say, with the settlement
# account its pain.001 export needs.
README_PRELUDE = """
```sh
pointsx init --listen 127.0.0.1:50051
```
<!-- config: pointsx-data/config.toml -->
```toml
[settlement]
iban = "DE02120300000000202051"
```
<!-- background -->
```sh
pointsx serve
```
"""
DOC_ADDRESS = "127.0.0.1:50051"
DOC_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/pointsx"
RUN_LANGUAGES = {"sh", "python"}
SERVING = "pointsx hub serving on"
BACKENDS = [b.strip() for b in os.environ.get("POINTSX_TEST_BACKENDS", "sqlite,postgres").split(",") if b.strip()]

_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
_COMMENT = re.compile(r"^\s*<!--(?P<body>.*)-->\s*$")
_MARKER = re.compile(r"^\s*(?P<name>not run|background|config|output)\s*(?::\s*(?P<arg>.*?))?\s*$")


class BlockFailed(AssertionError):
    """A block of a document did not do what the document says."""


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the first line of code (after the opening fence)
    lang: str
    text: str
    marker: str | None = None  # "not run", "background", "config", "output"
    marker_arg: str = ""
    problem: str = ""  # what is wrong with its marker, if anything

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"


def parse_blocks(path: Path, text: str | None = None) -> list[Block]:
    """The fenced blocks of a Markdown file, with the marker comment right before each, if any."""
    lines = (path.read_text() if text is None else text).splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent = len(opening["indent"])
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise BlockFailed(f"{path}:{i + 1}: a fence that is never closed")
        code = "\n".join(line[indent:] for line in lines[i + 1 : end]) + "\n"
        marker, arg, problem = None, "", ""
        comment = _COMMENT.match(lines[i - 1]) if i > 0 else None
        if comment:
            known = _MARKER.match(comment["body"])
            if known:
                marker, arg = known["name"], known["arg"] or ""
            else:
                problem = f"unknown marker <!--{comment['body']}-->"
        blocks.append(Block(path, i + 2, opening["lang"], code, marker, arg, problem))
        i = end + 1
    return blocks


def marker_problems(blocks: list[Block]) -> list[str]:
    problems = []
    previous: Block | None = None
    for block in blocks:
        if block.problem:
            problems.append(f"{block.where}: {block.problem}")
        elif block.marker is None and block.lang not in RUN_LANGUAGES:
            problems.append(
                f"{block.where}: a ```{block.lang} block that is neither run nor marked <!-- not run: why -->"
            )
        elif block.marker == "not run" and not block.marker_arg:
            problems.append(f"{block.where}: <!-- not run --> needs a reason after a colon")
        elif block.marker == "background" and block.lang != "sh":
            problems.append(f"{block.where}: <!-- background --> is for a ```sh block")
        elif block.marker == "config" and (block.lang != "toml" or not block.marker_arg):
            problems.append(f"{block.where}: <!-- config: PATH --> is for a ```toml block and names the file")
        elif block.marker == "output" and (previous is None or previous.marker or previous.lang not in RUN_LANGUAGES):
            problems.append(f"{block.where}: <!-- output --> must follow a block that runs")
        previous = block
    return problems


# --- static checks of the blocks that are not run --------------------------------------------
def _command_lines(script: str) -> Iterator[list[str]]:
    """Each simple command of a shell script, as words (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", script)
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for word in lexer:
            if word in {"&&", "||", ";", "|", "&"}:
                if command:
                    yield command
                command = []
            else:
                command.append(word)
        if command:
            yield command


def check_pointsx_commands(block: Block, script: str) -> None:
    """Every `pointsx …` line must parse with the real CLI parser: no invented commands or flags."""
    for words in _command_lines(script):
        if words[0] != "pointsx":
            continue
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                cli.build_parser().parse_args(words[1:])
        except SystemExit:
            raise BlockFailed(f"{block.where}: `{shlex.join(words)}` does not parse:\n{stderr.getvalue()}") from None


def check_python_statically(block: Block, source: str) -> None:
    """Compiles; imports resolve; names imported are used with attributes they have; calls on a
    MerchantClient name real methods with arguments their signatures accept."""
    import inspect

    tree = ast.parse(source, block.where)
    namespace: dict[str, object] = {}
    imports = ast.Module(body=[n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], type_ignores=[])
    exec(compile(imports, block.where, "exec"), namespace)
    clients = {
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
        for target in node.targets
        if isinstance(target, ast.Name) and "MerchantClient" in ast.unparse(node.value.func)
    }
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
            continue
        owner = node.value.id
        if owner in namespace and not hasattr(namespace[owner], node.attr):
            raise BlockFailed(f"{block.where}: {owner}.{node.attr} does not exist")
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        func = node.func
        if not (isinstance(func.value, ast.Name) and func.value.id in clients):
            continue
        method = getattr(MerchantClient, func.attr, None)
        if method is None:
            raise BlockFailed(f"{block.where}: MerchantClient has no method {func.attr}")
        placeholders = [object()] * len(node.args)
        keywords = {k.arg: object() for k in node.keywords if k.arg}
        try:
            inspect.signature(method).bind(None, *placeholders, **keywords)
        except TypeError as exc:
            raise BlockFailed(f"{block.where}: {ast.unparse(node)}: {exc}") from None


# --- running a story -------------------------------------------------------------------------
@dataclass
class Story:
    """A working directory, its environment and the hub its documents start, run block by block."""

    workdir: Path
    substitutions: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    background: subprocess.Popen[str] | None = None
    background_output: list[str] = field(default_factory=list)
    namespaces: list[dict[str, object]] = field(default_factory=list)
    last_output: str | None = None
    log: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        venv_bin = Path(sys.executable).parent
        assert (venv_bin / "pointsx").exists(), f"no pointsx beside {sys.executable}: pip install -e . first"
        env = {k: v for k, v in os.environ.items() if not k.startswith("POINTSX_")}
        env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
        env["COLUMNS"] = "200"  # rich tables as wide as they like, for the log of a failure
        self.env = env

    def substitute(self, text: str) -> str:
        for doc_value, real_value in self.substitutions.items():
            text = text.replace(doc_value, real_value)
        return text

    def run_document(self, path: Path, text: str | None = None) -> None:
        """Every block of the document in order; its Python blocks share one namespace."""
        self.namespaces.append({"__name__": f"doc:{path.name}"})
        for block in parse_blocks(path, text):
            self.run_block(block)

    def run_block(self, block: Block) -> None:
        text = self.substitute(block.text)
        self.log.append(f"--- {block.where} ({block.marker or block.lang}) at {time.monotonic() - self.started:.1f} s")
        if block.marker == "not run":
            if block.lang == "sh":
                check_pointsx_commands(block, text)
            elif block.lang == "python":
                check_python_statically(block, text)
            self.last_output = None
        elif block.marker == "background":
            self.start_background(block, text)
        elif block.marker == "config":
            self.apply_config(block, text)
        elif block.marker == "output":
            self.check_output(block, text)
        elif block.lang == "sh":
            self.last_output = self.shell(block, text)
        elif block.lang == "python":
            self.last_output = self.python(block, text)
        else:
            raise BlockFailed(f"{block.where}: a ```{block.lang} block that is neither run nor marked")

    def shell(self, block: Block, script: str) -> str:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.log.append(result.stdout + result.stderr)
        if result.returncode != 0:
            raise BlockFailed(
                f"{block.where}: exit {result.returncode}\n{script}\n--- stdout\n{result.stdout}"
                f"--- stderr\n{result.stderr}"
            )
        return result.stdout

    def python(self, block: Block, source: str) -> str:
        code = compile("\n" * (block.line - 1) + source, str(block.path), "exec")  # tracebacks name doc lines
        out = io.StringIO()
        cwd = Path.cwd()
        os.chdir(self.workdir)
        try:
            with contextlib.redirect_stdout(out):
                exec(code, self.namespaces[-1])
        except Exception as exc:
            raise BlockFailed(f"{block.where}: {type(exc).__name__}: {exc}\n--- printed\n{out.getvalue()}") from exc
        finally:
            os.chdir(cwd)
            self.log.append(out.getvalue())
        return out.getvalue()

    def start_background(self, block: Block, script: str) -> None:
        self.stop_background()
        self.background_output = []
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.background = proc
        assert proc.stdout is not None
        stdout = proc.stdout
        threading.Thread(target=lambda: self.background_output.extend(stdout), daemon=True).start()
        deadline = time.monotonic() + 30
        while not any(SERVING in line for line in self.background_output):
            if proc.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.2)
                raise BlockFailed(
                    f"{block.where}: `{script.strip()}` did not serve:\n{''.join(self.background_output)}"
                )
            time.sleep(0.05)
        self.log.append("".join(self.background_output))
        self.last_output = None

    def stop_background(self) -> None:
        proc, self.background = self.background, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise BlockFailed(f"the hub did not stop on SIGTERM:\n{''.join(self.background_output)}") from None
        if proc.returncode != 0:
            raise BlockFailed(f"the hub exited {proc.returncode} on SIGTERM:\n{''.join(self.background_output)}")

    def apply_config(self, block: Block, excerpt: str) -> None:
        """Set each key of the excerpt in its section of the file; a key the file lacks is an error."""
        path = self.workdir / block.marker_arg
        lines = path.read_text().splitlines()
        for section, values in tomllib.loads(excerpt).items():
            try:
                start = lines.index(f"[{section}]")
            except ValueError:
                raise BlockFailed(f"{block.where}: {block.marker_arg} has no section [{section}]") from None
            end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
            for key, value in values.items():
                at = next((i for i in range(start, end) if re.match(rf"{re.escape(key)}\s*=", lines[i])), None)
                if at is None:
                    raise BlockFailed(f"{block.where}: [{section}] of {block.marker_arg} has no key {key}")
                lines[at] = f"{key} = {json.dumps(value)}"
        path.write_text("\n".join(lines) + "\n")
        tomllib.loads(path.read_text())
        self.last_output = None

    def check_output(self, block: Block, expected: str) -> None:
        got = [line.rstrip() for line in (self.last_output or "").strip().splitlines()]
        want = [line.rstrip() for line in expected.strip().splitlines()]
        if got != want:
            raise BlockFailed(f"{block.where}: the block above printed\n" + "\n".join(got))
        self.last_output = None

    def close(self) -> None:
        for namespace in self.namespaces:  # what a failed document left open
            for value in list(namespace.values()):
                if isinstance(value, MerchantClient):
                    value.close()
        self.stop_background()


@contextlib.contextmanager
def story(tmp_path: Path, **substitutions: str) -> Iterator[Story]:
    running = Story(tmp_path, {DOC_ADDRESS: f"127.0.0.1:{free_port()}", **substitutions})
    try:
        yield running
    except BlockFailed as failure:
        raise BlockFailed(f"{failure}\n=== the story so far\n" + "\n".join(running.log[-40:])) from None
    finally:
        running.close()


# --- the tests -------------------------------------------------------------------------------
def test_every_block_is_run_or_marked() -> None:
    problems = [p for doc in DOCS for p in marker_problems(parse_blocks(doc))]
    in_stories = {*MERCHANT_STORY, *OPERATOR_STORY, *README_STORY}
    for doc in DOCS:
        runnable = [b for b in parse_blocks(doc) if b.marker != "not run"]
        if doc not in in_stories and runnable:
            problems.append(f"{runnable[0].where}: runs, but {doc.name} is in no story of {Path(__file__).name}")
    assert not problems, "\n".join(problems)
    for doc in (*MERCHANT_STORY, *OPERATOR_STORY):
        blocks = parse_blocks(doc)
        assert sum(1 for b in blocks if b.marker is None and b.lang in RUN_LANGUAGES) >= 5, f"{doc.name}: a story?"


def test_merchant_quickstart_then_protocol(tmp_path: Path) -> None:
    with story(tmp_path) as running:
        for doc in MERCHANT_STORY:
            running.run_document(doc)


@pytest.mark.skipif("postgres" not in BACKENDS, reason="POINTSX_TEST_BACKENDS leaves PostgreSQL out")
def test_operator_guide(tmp_path: Path) -> None:
    name = f"pointsx_doc_{uuid.uuid4().hex[:12]}"  # empty: the guide migrates it itself
    url = harness._url(name)
    with harness._admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        with story(tmp_path, **{DOC_DATABASE_URL: url}) as running:
            for doc in OPERATOR_STORY:
                running.run_document(doc)
    finally:
        harness.drop_postgres_database(name)


def test_readme(tmp_path: Path) -> None:
    with story(tmp_path) as running:
        running.run_document(ROOT / "README.md (prelude)", README_PRELUDE)
        for doc in README_STORY:
            running.run_document(doc)


NOT_RUN = "<!-- not run: an example -->\n"
WRONG = {
    "an invented flag": "```sh\npointsx keygen --outfile brew.key\n```",
    "an invented flag, not run": NOT_RUN + "```sh\npointsx operator list-merchants --all\n```",
    "a failing block": '```python\nassert 1 + 1 == 3, "the doc is wrong"\n```',
    "other output": '```python\nprint("one")\n```\n<!-- output -->\n```text\ntwo\n```',
    "a bad call, not run": NOT_RUN + '```python\nc = MerchantClient("t", "m", k)\nc.convert("a", "b", quote="q")\n```',
    "a bad name, not run": NOT_RUN + "```python\nfrom merchant_sdk import errors\nerrors.NoSuchReason\n```",
    "an unknown config key": "<!-- config: c.toml -->\n```toml\n[hub]\nlisten_on = 1\n```",
}
UNMARKED = {
    "an unmarked bash block": "```bash\npointsx demo\n```",
    "a misspelt marker": "<!-- not-run: typo -->\n```sh\npointsx demo\n```",
    "a marker without a reason": "<!-- not run -->\n```python\nprint(1)\n```",
}


@pytest.mark.parametrize("doc", WRONG.values(), ids=WRONG.keys())
def test_a_wrong_block_fails(tmp_path: Path, doc: str) -> None:
    """The test can fail: an invented flag, a failing block, a bad call, a config key that is not."""
    (tmp_path / "c.toml").write_text('[hub]\nlisten = "x"\n')
    assert not marker_problems(parse_blocks(tmp_path / "wrong.md", doc))
    running = Story(tmp_path, {})
    with pytest.raises(BlockFailed):
        running.run_document(tmp_path / "wrong.md", doc)
    running.close()


@pytest.mark.parametrize("doc", UNMARKED.values(), ids=UNMARKED.keys())
def test_an_unmarked_block_is_found(tmp_path: Path, doc: str) -> None:
    assert marker_problems(parse_blocks(tmp_path / "wrong.md", doc))


def test_protocol_lists_every_reason_and_method() -> None:
    from merchant_sdk._pb.pointsx.v1 import (
        clearing_pb2,
        exchange_pb2,
        ledger_pb2,
        merchant_pb2,
        network_pb2,
        operator_pb2,
    )

    text = (ROOT / "docs" / "protocol.md").read_text()
    missing = [reason for reason in errors.REASONS if f"`{reason}`" not in text]
    assert not missing, f"reasons not in docs/protocol.md: {missing}"
    for module in (network_pb2, merchant_pb2, ledger_pb2, exchange_pb2, clearing_pb2, operator_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            assert f"`{service.name}`" in text
            for method in service.methods:
                assert f"`{method.name}`" in text, f"{service.name}.{method.name} is not in docs/protocol.md"


def test_operator_guide_runs_every_command() -> None:
    """Each `pointsx` subcommand appears in a block of the operator guide that runs."""
    ran = " ".join(
        " ".join(words)
        for block in parse_blocks(ROOT / "docs" / "operator-guide.md")
        if block.marker in (None, "background") and block.lang == "sh"
        for words in _command_lines(block.text)
    )
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    commands: list[str] = []
    for name, parser in sub.choices.items():  # type: ignore[union-attr]
        nested = [a for a in parser._actions if a.dest.endswith("_command")]
        commands += [f"pointsx {name} {child}" for child in nested[0].choices] if nested else [f"pointsx {name}"]
    missing = [c for c in commands if c not in ran and c != "pointsx demo"]
    assert not missing, f"commands the operator guide never runs: {missing}"
