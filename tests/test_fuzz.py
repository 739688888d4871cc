"""A fuzz campaign: generated malformed inputs across every file and request selfspec reads.

Each case ends in one of two ways: a clear error (a :class:`SelfspecError` naming the file, which the
CLI prints as one line with exit code 2, or an OpenAI-shaped 4xx from the server), or a correct
result. A traceback, a hang, a 5xx, a lost request or a half-written stage fails the case. The cases
are generated from seeded mutations of valid inputs (truncations, wrong JSON, wrong types, wrong
encodings, huge lines, symlinks out of the tree), so every run tries the same ones.
Its last test prints the counts: ``fuzz: cases=... clear_errors=... results=... tracebacks=0 hangs=0``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import traceback
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from selfspec_core.errors import SelfspecError

TALLY: Counter = Counter()
TIMEOUT_S = 60


class Hang(BaseException):
    """A case ran past its time (BaseException: nothing under test may swallow it)."""


def outcome(name: str, action) -> tuple[str, str]:
    """Run one case: ('result' | 'clear_error' | 'traceback' | 'hang', detail); counted in TALLY."""

    def alarm(*_):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(TIMEOUT_S)
    try:
        action()
        kind, detail = "result", ""
    except SelfspecError as exc:
        message = str(exc).strip()
        kind, detail = ("clear_error", message) if message else ("traceback", "an empty error message")
    except Hang:
        kind, detail = "hang", f"over {TIMEOUT_S}s"
    except Exception:
        kind, detail = "traceback", traceback.format_exc()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    TALLY["cases"] += 1
    TALLY[{"clear_error": "clear_errors", "result": "results", "traceback": "tracebacks", "hang": "hangs"}[kind]] += 1
    return kind, f"{name}: {detail}"


def campaign(cases, check=None) -> None:
    """Run ``(name, action)`` cases; fail listing every case that ended in a traceback, a hang or a failed check."""
    failures = []
    for name, action in cases:
        kind, detail = outcome(name, action)
        if os.environ.get("SELFSPEC_FUZZ_VERBOSE"):  # see every case's ending
            print(f"{kind:12} {detail.splitlines()[0][:200] if detail else name}")
        if kind in ("traceback", "hang"):
            failures.append(f"[{kind}] {detail}")
        elif check is not None:
            problem = check(name, kind, detail)
            if problem:
                failures.append(f"[check] {name}: {problem}")
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------------------
# Mutations


WRONG_VALUES = [3, None, [], {"a": 1}, True, 1.5e308, "", "x" * 3]


def truncations(data: bytes, rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    return [(f"truncated@{cut}", data[:cut]) for cut in sorted(rng.sample(range(1, len(data)), count))]


def encodings(text: str) -> list[tuple[str, bytes]]:
    return [
        ("utf-16", text.encode("utf-16")),
        ("latin-1", (text + "é").encode("latin-1")),
        ("utf-8-bom", b"\xef\xbb\xbf" + text.encode()),
        ("nul-bytes", text.encode().replace(b"\n", b"\x00\n", 1)),
        ("bad-continuation", text.encode()[:5] + b"\xc3\x28" + text.encode()[5:]),
    ]


def wrong_json(line: str) -> list[tuple[str, bytes]]:
    return [
        ("missing-brace", (line[:-1] + "\n").encode()),
        ("trailing-comma", (line[:-1] + ",}\n").encode()),
        ("single-quotes", (line.replace('"', "'") + "\n").encode()),
        ("nan", b'{"id": NaN}\n'),
        ("bare-string", b'"just text"\n'),
        ("array", b"[1, 2, 3]\n"),
        ("number", b"42\n"),
        ("null", b"null\n"),
    ]


def json_lines(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def file_mutations(
    rows: list[dict], fields: list[str], rng: random.Random, huge: int = 300_000
) -> list[tuple[str, bytes]]:
    """Malformed versions of the JSONL file of ``rows``: each field given each wrong value, and the rest."""
    valid = json_lines(rows)
    cases = truncations(valid, rng, 4) + encodings(valid.decode()) + wrong_json(json.dumps(rows[0]))
    for field in fields:
        for value in rng.sample(WRONG_VALUES, 3):
            cases.append((f"{field}={value!r}"[:40], json_lines([{**rows[0], field: value}, *rows[1:]])))
    cases.append(("huge-line", json_lines([{**rows[0], fields[-1]: "word " * (huge // 5)}])))
    cases.append(("empty", b""))
    cases.append(("blank-lines", b"\n \n\t\n"))
    return cases


def write_case(folder: Path, name: str, content: bytes | None, suffix: str) -> Path:
    path = folder / f"case{suffix}"
    if path.is_symlink() or path.exists():
        path.unlink()
    path.write_bytes(content)
    return path


def symlink_cases(folder: Path, suffix: str, outside: Path) -> list[tuple[str, Path]]:
    """Paths that are symlinks: out of the tree to a file and to a folder, and dangling."""
    targets = {
        "symlink-out-file": outside / "outside.txt",
        "symlink-out-dir": outside,
        "symlink-dangling": outside / "gone",
    }
    (outside / "outside.txt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    paths = []
    for name, target in targets.items():
        link = folder / f"{name}{suffix}"
        link.symlink_to(target)
        paths.append((name, link))
    return paths


def loader_cases(tmp_path: Path, rows, fields, suffix, load, seed: int):
    """(name, action) cases that give ``load`` each mutated file, then each symlink out of the tree."""
    rng = random.Random(seed)
    folder, outside = tmp_path / "tree", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    cases = []
    for name, content in file_mutations(rows, fields, rng):
        cases.append((name, lambda content=content, name=name: load(write_case(folder, name, content, suffix))))
    for name, link in symlink_cases(folder, suffix, outside):
        cases.append((name, lambda link=link: load(link)))
    return cases


def names_the_file(name: str, kind: str, detail: str) -> str | None:
    if kind == "clear_error" and "case" not in detail and "symlink" not in detail:
        return "the error does not name the file"
    return None


# --------------------------------------------------------------------------------------------------
# Files the user writes


SEEDS = [
    {"id": f"s{i}", "task_type": "qa", "instruction": f"What is ratio {i}?", "input": "", "output": f"Ratio {i}."}
    for i in range(3)
]


def test_seed_files(tmp_path):
    from selfspec_core.data.seeds import load_seeds

    campaign(
        loader_cases(tmp_path, SEEDS, ["id", "task_type", "instruction", "input", "output"], ".jsonl", load_seeds, 1),
        names_the_file,
    )
    yaml_cases = [
        ("yaml-tabs", b"- id: a\n\ttask_type: qa\n"),
        (
            "yaml-alias-bomb",
            b"a: &a [x, x, x, x, x, x, x, x, x]\n"
            b"b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
            b"d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n",
        ),
        ("yaml-python-tag", b"- !!python/object/apply:os.system ['echo hi']\n"),
        ("yaml-scalar", b"just words\n"),
        ("yaml-list-of-lists", b"- [1, 2]\n- [3]\n"),
    ]
    folder = tmp_path / "yaml"
    folder.mkdir()
    campaign(
        [
            (name, lambda c=content, n=name: load_seeds(write_case(folder, n, c, ".yaml")))
            for name, content in yaml_cases
        ],
        names_the_file,
    )


def test_evaluation_files(tmp_path):
    from selfspec_core.stages.evaluate import read_eval_file

    rows = [
        {
            "instruction": "Sentiment?",
            "input": "Profit rose.",
            "output": "positive",
            "choices": ["positive", "negative"],
        },
        {"instruction": "Sum?", "input": "2 + 2", "output": "4"},
    ]
    campaign(
        loader_cases(tmp_path, rows, ["instruction", "input", "output", "choices", "id"], ".jsonl", read_eval_file, 2),
        names_the_file,
    )


def test_config_files(tmp_path):
    from selfspec_core.config import load_settings

    rng = random.Random(3)
    valid = (
        b'seed = 7\n[generate]\nnum_instructions = 20\n[train]\nlora_r = 8\nquant = "none"\n'
        b"[respond]\nretrieval = false\n"
    )
    cases = [
        (f"toml-{name}", content, ".toml") for name, content in truncations(valid, rng, 6) + encodings(valid.decode())
    ]
    for key in (
        "seed",
        "generate.num_instructions",
        "train.lora_r",
        "respond.retrieval",
        "evaluate.tasks",
        "train.quant",
    ):
        section, _, name = key.rpartition(".")
        for value in ('"eight"', "[1, 2]", "1e400", "-5", "{a = 1}", "true", "9999999999999999999999"):
            text = (f"[{section}]\n" if section else "") + f"{name} = {value}\n"
            cases.append((f"{key}={value}", text.encode(), ".toml"))
    cases += [
        ("yaml-list", b"- 1\n", ".yaml"),
        ("yaml-bad", b"train: [\n", ".yaml"),
        ("yaml-null", b"~\n", ".yml"),
        ("yaml-nested", b"train:\n  lora_r:\n    deep: 1\n", ".yaml"),
        ("ini", b"[x]\n", ".ini"),
    ]
    folder = tmp_path / "configs"
    folder.mkdir()
    actions = [
        (name, lambda c=content, n=name, s=suffix: load_settings("tiny", write_case(folder, n, c, s)))
        for name, content, suffix in cases
    ]
    outside = tmp_path / "outside"
    outside.mkdir()
    actions += [
        (name, lambda link=link: load_settings("tiny", link)) for name, link in symlink_cases(folder, ".toml", outside)
    ]
    campaign(actions, names_the_file)


def test_corpora(tmp_path):
    from selfspec_core.data.retrieval import load_corpus

    rows = [
        {"id": "d1", "title": "Rates", "text": "Central banks raised rates. " * 5},
        {"id": "d2", "text": "Margins fell."},
    ]
    cases = loader_cases(tmp_path, rows, ["id", "title", "text"], ".jsonl", lambda path: load_corpus([path]), 4)
    folder = tmp_path / "other-formats"
    folder.mkdir()
    others = [
        ("csv-binary", b"\x00\x01\x02,\xff\n", ".csv"),
        ("csv-ragged", b"id,text\n1\n2,a,b,c\n", ".csv"),
        ("csv-no-text", b"id,n\n1,2\n", ".csv"),
        ("parquet-garbage", b"PAR1 not really", ".parquet"),
        ("parquet-empty", b"", ".parquet"),
        ("txt-not-utf8", b"caf\xe9\n", ".txt"),
        ("txt-huge-line", b"w" * 2_000_000, ".txt"),
    ]
    cases += [
        (name, lambda c=content, n=name, s=suffix: load_corpus([write_case(folder, n, c, s)]))
        for name, content, suffix in others
    ]
    escape = tmp_path / "escape"
    escape.mkdir()
    (escape / "inside.txt").write_text("A real document about rates.\n")
    (escape / "out.txt").symlink_to(tmp_path / "outside" / "outside.txt")
    (escape / "loop").symlink_to(escape)
    cases.append(("folder-with-symlinks-out-and-a-loop", lambda: load_corpus([escape])))
    campaign(cases, names_the_file)


# --------------------------------------------------------------------------------------------------
# Adapter folders


def test_adapter_folders(tmp_path, tiny_model_dir):
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model

    from selfspec_core.models.loading import ModelRef, load_adapter, load_model
    from selfspec_core.testing import build_tiny_model

    ref = ModelRef("tiny", str(tiny_model_dir))
    torch.manual_seed(0)
    good = tmp_path / "good"
    get_peft_model(load_model(ref), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(good)
    wider = build_tiny_model(tmp_path / "wider-model", hidden_size=64)
    other = tmp_path / "other-base"
    get_peft_model(
        load_model(ModelRef("wide", str(wider))), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    ).save_pretrained(other)
    weights = (good / "adapter_model.safetensors").read_bytes()
    config = json.loads((good / "adapter_config.json").read_text())
    rng = random.Random(5)

    def variant(name, config_bytes=None, weight_bytes=None, drop=()):
        folder = tmp_path / "variants" / name
        shutil.copytree(good, folder)
        if config_bytes is not None:
            (folder / "adapter_config.json").write_bytes(config_bytes)
        if weight_bytes is not None:
            (folder / "adapter_model.safetensors").write_bytes(weight_bytes)
        for file in drop:
            (folder / file).unlink()
        return folder

    folders = [
        ("missing", tmp_path / "nowhere"),
        ("a-file", tmp_path / "good" / "adapter_config.json"),
        ("empty", tmp_path / "empty"),
        ("other-base", other),
    ]
    (tmp_path / "empty").mkdir()
    folders += [
        (f"weights-{name}", variant(f"weights-{name}", weight_bytes=data))
        for name, data in truncations(weights, rng, 5)
        + [
            ("zero", b""),
            ("random", bytes(rng.randrange(256) for _ in range(512))),
            ("huge-header", (2**62).to_bytes(8, "little") + b"{}"),
        ]
    ]
    folders += [
        (f"config-{name}", variant(f"config-{name}", config_bytes=data))
        for name, data in truncations(json.dumps(config).encode(), rng, 3)
        + encodings(json.dumps(config))[:2]
        + [
            ("list", b"[]"),
            ("peft-type-int", json.dumps({**config, "peft_type": 3}).encode()),
            ("r-string", json.dumps({**config, "r": "four"}).encode()),
            ("no-targets-match", json.dumps({**config, "target_modules": ["nowhere_proj"]}).encode()),
        ]
    ]
    folders += [
        ("no-config", variant("no-config", drop=["adapter_config.json"])),
        ("no-weights", variant("no-weights", drop=["adapter_model.safetensors"])),
    ]
    link = tmp_path / "link-out"
    link.symlink_to(good)  # a symlink to a good adapter elsewhere: a correct result
    folders.append(("symlink-to-good", link))
    base = load_model(ref)

    def load(folder):
        load_adapter(base, folder).unload()  # unload: the next case starts from the plain base again

    campaign([(name, lambda folder=folder: load(folder)) for name, folder in folders])
    kind, _ = outcome("good", lambda: load(good))
    assert kind == "result"


# --------------------------------------------------------------------------------------------------
# Run-directory files, through the command line: one line, exit 2, and no stage half-written


def run_cli(argv: list[str], cwd: Path) -> tuple[int, str]:
    """The CLI in this process (fast: imports are shared), as a user would see it: exit code and stderr."""
    from selfspec_core.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(previous)
    return code, err.getvalue()


class CliFailed(Exception):
    """The command did not end in a one-line error or success."""


def stage_states(run: Path) -> dict[str, bytes | None]:
    """Each stage folder's manifest bytes (None: a folder without one)."""
    from selfspec_core.run.rundir import STAGES

    manifests = {stage: run / stage / "manifest.json" for stage in STAGES if (run / stage).is_dir()}
    return {stage: path.read_bytes() if path.is_file() else None for stage, path in manifests.items()}


def cli_case(run: Path, argv: list[str]):
    """An action: run the command on ``run``; a one-line error becomes SelfspecError, anything else CliFailed.

    A failed command must leave every stage folder as it was; a successful one may only seal stages
    (a folder it made or changed holds a manifest that is a JSON object).
    """

    def action():
        before = stage_states(run)
        code, err = run_cli(argv, run.parent)
        after = stage_states(run)
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        noise = [marker for marker in ("Traceback", "Loading weights", "Warning:") if marker in err]
        if noise:
            raise CliFailed(f"{noise} on the console:\n{err}")
        if code == 0:
            for stage, manifest in after.items():
                if manifest != before.get(stage) and not isinstance(json.loads(manifest or b"null"), dict):
                    raise CliFailed(f"stage {stage} half-written")
            return
        if code != 2 or len(errors) != 1 or err.strip().splitlines()[-1] != errors[0]:
            raise CliFailed(f"exit {code}, stderr:\n{err}")
        if after != before:
            raise CliFailed(
                f"a stage changed although the command failed: {sorted(set(after.items()) ^ set(before.items()))}"
            )
        raise SelfspecError(errors[0])

    return action


def make_run(root: Path, name: str, files: dict[str, bytes | Path], sealed=("generate", "respond")) -> Path:
    """A finance run directory with ``files`` (bytes, or a Path to symlink to); ``sealed`` stages get a manifest."""
    run = root / name
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"domain": "finance", "version": "0.1.0"}))
    for stage in sealed:
        (run / stage).mkdir()
        (run / stage / "manifest.json").write_text("{}")
    for relative, content in files.items():
        path = run / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            path.symlink_to(content)
        else:
            path.write_bytes(content)
    return run


def test_run_directory_files(tmp_path, tiny_model_dir):
    rng = random.Random(6)
    common = ["--domain", "finance", "--model", str(tiny_model_dir), "--profile", "tiny"]
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_bytes(json_lines(SEEDS))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    instructions = [
        {"id": "i1", "instruction": "Explain EBITDA.", "input": "", "task_type": "qa", "seed_ids": ["s0"], "round": 0}
    ]
    records = [
        {
            "id": "r1",
            "instruction": "Explain EBITDA.",
            "input": "",
            "output": "Earnings before interest.",
            "seed_ids": ["s0"],
        }
    ]
    cases = []
    run_json = json.dumps({"domain": "finance", "version": "0.1.0"})
    for name, content in (
        truncations(run_json.encode(), rng, 3)
        + encodings(run_json)[:3]
        + [
            ("list", b"[]"),
            ("domain-int", b'{"domain": 3, "version": "0.1.0"}'),
            ("version-list", b'{"domain": "finance", "version": [0, 1]}'),
            ("null", b"null"),
        ]
    ):
        run = make_run(tmp_path / "run-json", name, {}, sealed=())
        (run / "run.json").write_bytes(content)
        cases.append((f"run.json {name}", cli_case(run, ["train", *common, "--out", str(run), "--seeds", str(seeds)])))
    for name, content in file_mutations(records, ["instruction", "output"], rng):
        run = make_run(tmp_path / "data", name, {"respond/data.jsonl": content})
        cases.append(
            (f"respond/data.jsonl {name}", cli_case(run, ["train", *common, "--out", str(run), "--seeds", str(seeds)]))
        )
    for name, content in file_mutations(instructions, ["instruction", "input", "id"], rng):
        run = make_run(tmp_path / "instructions", name, {"generate/instructions.jsonl": content})
        cases.append(
            (
                f"generate/instructions.jsonl {name}",
                cli_case(run, ["respond", *common, "--out", str(run), "--seeds", str(seeds), "--retrieval", "off"]),
            )
        )
    for name, content in (
        ("list", b"[]"),
        ("truncated", b'{"config_hash": "a'),
        ("number", b"7"),
        ("not-utf8", b"\xff\xfe"),
    ):
        run = make_run(tmp_path / "manifests", name, {"respond/data.jsonl": b"{nope\n"})
        (run / "respond" / "manifest.json").write_bytes(content)
        cases.append(
            (
                f"respond/manifest.json {name}",
                cli_case(run, ["train", *common, "--out", str(run), "--seeds", str(seeds)]),
            )
        )
    run = make_run(tmp_path / "symlinks", "data-out", {"respond/data.jsonl": outside / "passwd"})
    cases.append(
        ("respond/data.jsonl symlink out", cli_case(run, ["train", *common, "--out", str(run), "--seeds", str(seeds)]))
    )
    run = make_run(tmp_path / "symlinks", "data-dangling", {"respond/data.jsonl": outside / "gone"})
    cases.append(
        ("respond/data.jsonl dangling", cli_case(run, ["train", *common, "--out", str(run), "--seeds", str(seeds)]))
    )
    run = make_run(tmp_path / "symlinks", "data-is-dir", {"respond/data.jsonl": outside})
    cases.append(
        ("respond/data.jsonl a folder", cli_case(run, ["train", *common, "--out", str(run), "--seeds", str(seeds)]))
    )
    run = make_run(tmp_path / "symlinks", "run-json-out", {}, sealed=())
    (run / "run.json").unlink()
    (run / "run.json").symlink_to(outside / "passwd")
    cases.append(("run.json symlink out", cli_case(run, ["train", *common, "--out", str(run), "--seeds", str(seeds)])))
    link = tmp_path / "symlinks" / "run-link"
    link.symlink_to(make_run(tmp_path / "symlinks", "real-run", {}))
    cases.append(
        ("--out a symlink to a run", cli_case(link, ["train", *common, "--out", str(link), "--seeds", str(seeds)]))
    )
    run = make_run(tmp_path / "symlinks", "evaluate-adapter-out", {})
    cases.append(
        (
            "evaluate --adapter outside, missing",
            cli_case(run, ["evaluate", *common, "--out", str(run), "--adapter", str(outside / "gone")]),
        )
    )
    cases.append(
        (
            "evaluate --adapter a file",
            cli_case(run, ["evaluate", *common, "--out", str(run), "--adapter", str(outside / "passwd")]),
        )
    )
    campaign(cases)


# --------------------------------------------------------------------------------------------------
# Server requests


def test_server_requests(tiny_model_dir):
    from selfspec_core.models.generator import HFGenerator
    from selfspec_core.models.loading import ModelRef, load_model, load_tokenizer
    from selfspec_core.serve.app import ServeLimits, ServerThread, create_app

    ref = ModelRef("tiny", str(tiny_model_dir))
    tokenizer = load_tokenizer(ref)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    app = create_app(
        HFGenerator(load_model(ref), tokenizer, 8), "tiny", limits=ServeLimits(max_tokens=32, max_body_bytes=65536)
    )
    good_completion = {"prompt": "The company", "max_tokens": 4, "temperature": 0}
    good_chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    rng = random.Random(7)
    bodies: list[tuple[str, str, bytes]] = []
    for path, good in (("/completions", good_completion), ("/chat/completions", good_chat)):
        text = json.dumps(good)
        bodies += [
            (path, f"truncated@{cut}", text[:cut].encode()) for cut in sorted(rng.sample(range(1, len(text)), 3))
        ]
        for field in list(good) + ["n", "stop", "seed", "top_p", "logprobs", "echo", "stream", "model"]:
            for value in rng.sample([-1, 0, 10**30, "x", [], {}, None, True, 1.5, [1, 2], "\udcff"], 3):
                bodies.append(
                    (
                        path,
                        f"{field}={value!r}"[:40],
                        json.dumps({**good, field: value}).encode("utf-8", "surrogatepass"),
                    )
                )
    bodies += [
        ("/completions", "not-json", b"{nope"),
        ("/completions", "array", b"[1, 2]"),
        ("/completions", "empty", b""),
        ("/completions", "not-utf8", b'{"prompt": "\xff\xfe"}'),
        ("/completions", "nan", b'{"prompt": "a", "temperature": NaN}'),
        ("/completions", "prompt-ints", b'{"prompt": [1, 2, 3]}'),
        ("/completions", "deep", b"[" * 5000 + b"]" * 5000),
        ("/completions", "huge-body", json.dumps({"prompt": "w " * 40000}).encode()),
        ("/completions", "many-stops", json.dumps({**good_completion, "stop": ["a"] * 1000}).encode()),
        (
            "/chat/completions",
            "content-parts",
            json.dumps({"messages": [{"role": "user", "content": [{"type": "image"}, 3]}]}).encode(),
        ),
        ("/chat/completions", "no-role", json.dumps({"messages": [{"content": "x"}]}).encode()),
        ("/nowhere", "unknown-path", b"{}"),
    ]

    def request(url: str, path: str, body: bytes):
        def action():
            req = urllib.request.Request(url + path, body, {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as response:
                    payload = json.loads(response.read())
                    if "choices" not in payload:
                        raise AssertionError(f"200 without choices: {payload}")
            except urllib.error.HTTPError as error:
                payload = json.loads(error.read())
                message = payload.get("error", {}).get("message") if isinstance(payload.get("error"), dict) else None
                if error.code >= 500 or not message:
                    raise AssertionError(f"HTTP {error.code}: {payload}") from None
                raise SelfspecError(f"HTTP {error.code}: {message}") from None

        return action

    with ServerThread(app) as server:
        campaign([(f"{path} {name}", request(server.url, path, body)) for path, name, body in bodies])
        kind, _ = outcome("still answers", request(server.url, "/completions", json.dumps(good_completion).encode()))
        assert kind == "result"


def test_campaign_counts(capsys):
    """At least 100 cases, and none ended in a traceback or a hang (the earlier tests fail on any)."""
    with capsys.disabled():
        print(
            f"\nfuzz: cases={TALLY['cases']} clear_errors={TALLY['clear_errors']} results={TALLY['results']} "
            f"tracebacks={TALLY['tracebacks']} hangs={TALLY['hangs']}"
        )
    assert TALLY["cases"] >= 100, TALLY
    assert TALLY["tracebacks"] == 0 and TALLY["hangs"] == 0, TALLY
    assert TALLY["clear_errors"] + TALLY["results"] == TALLY["cases"]
