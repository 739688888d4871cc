"""Where data comes from: the data directory wins, then the plugin's shipped copy, then the Hub.

The Hub path runs the real ``datasets.load_dataset`` on folders laid out like Hub dataset
repositories (``$SELFSPEC_HUB_MIRROR``), never the network.
"""

import gzip
import json

import pytest
from click.testing import CliRunner

from selfspec_core.cli.main import cli
from selfspec_core.data import datasources
from selfspec_core.data.datasources import DataSource, HubDataset, find, status
from selfspec_core.data.tasks import EvalItem, EvalTask
from selfspec_core.errors import SelfspecError
from selfspec_core.stages.evaluate import read_items
from selfspec_core.testing import use_hub_mirror, write_hub_dataset

HUB = HubDataset(
    "someone/sentiment", config="strict", split="test", columns={"text": "sentence", "first_context": "context.first"}
)


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A Hub mirror with one repository: config ``strict``, a ClassLabel column and a struct column."""
    import datasets

    features = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "neutral", "positive"]),
            "context": {"first": datasets.Value("string"), "second": datasets.Value("string")},
        }
    )
    rows = {
        "sentence": ["Profit rose.", "Sales fell.", "The board met."],
        "label": [2, 0, 1],
        "context": [{"first": f"c{i}", "second": "-"} for i in range(3)],
    }
    folder = tmp_path / "mirror"
    write_hub_dataset(
        folder / "someone" / "sentiment", {"strict": {"test": datasets.Dataset.from_dict(rows, features=features)}}
    )
    use_hub_mirror(monkeypatch, folder)
    monkeypatch.delenv("SELFSPEC_DATA", raising=False)
    for name in datasources.OFFLINE_ENVS:
        monkeypatch.delenv(name, raising=False)
    return folder


def load_lines(path):
    return [
        EvalItem(str(n), "Sentiment?", line.split("@")[0], line.split("@")[1], ("negative", "neutral", "positive"))
        for n, line in enumerate(datasources.read_text(path).splitlines())
    ]


def load_rows(rows):
    return [
        EvalItem(str(n), "Sentiment?", row["text"], row["label"], ("negative", "neutral", "positive"))
        for n, row in enumerate(rows)
    ]


def sentiment_task(shipped=None, hub=HUB):
    return EvalTask(
        "sentiment",
        "tinydom",
        "tiny/sentences.txt",
        load_lines,
        shipped=shipped,
        hub=hub,
        load_rows=load_rows if hub else None,
        origin="example.org/sentences",
        licence="CC BY 4.0",
    )


def test_hub_rows_have_renamed_columns_and_label_names(mirror):
    found = find(DataSource("sentiment", "tiny/sentences.txt", "CC BY 4.0", hub=HUB), None, print)
    assert found.where == "hub" and found.path is None and "hf:someone/sentiment config=strict" in found.detail
    assert found.rows[0] == {
        "label": "positive",
        "text": "Profit rose.",
        "first_context": "c0",
        "context": {"first": "c0", "second": "-"},
    }  # columns not mapped pass through
    assert [row["label"] for row in found.rows] == ["positive", "negative", "neutral"]


def test_a_task_reads_the_hub_when_the_data_dir_and_package_lack_it(mirror, tmp_path, capsys):
    items = read_items(sentiment_task(), tmp_path / "empty-data-dir")
    assert [(item.input, item.answer) for item in items] == [
        ("Profit rose.", "positive"),
        ("Sales fell.", "negative"),
        ("The board met.", "neutral"),
    ]
    assert "[data] fetching task sentiment (tinydom) from hf:someone/sentiment" in capsys.readouterr().out


def test_the_data_dir_wins_then_the_shipped_copy_then_the_hub(mirror, tmp_path):
    shipped = tmp_path / "package" / "sentences.txt.gz"
    shipped.parent.mkdir()
    shipped.write_bytes(gzip.compress(b"Shipped sentence.@neutral\n"))
    data_dir = tmp_path / "data"
    task = sentiment_task(shipped=shipped)
    assert status(task.source, data_dir)[0] == "shipped"
    assert [item.input for item in read_items(task, data_dir)] == ["Shipped sentence."]
    (data_dir / "tiny").mkdir(parents=True)
    (data_dir / "tiny" / "sentences.txt").write_text("Local sentence.@positive\n")
    assert status(task.source, data_dir) == ("data dir", str(data_dir / "tiny" / "sentences.txt"))
    assert [item.input for item in read_items(task, data_dir)] == ["Local sentence."]
    shipped.unlink()
    (data_dir / "tiny" / "sentences.txt").unlink()
    assert status(task.source, data_dir)[0] == "hub cache"  # the mirror answers without a network


def test_offline_and_uncached_says_what_to_put_where(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = sentiment_task(hub=HubDataset("someone/not-mirrored"))
    state, detail = status(task.source, tmp_path)
    assert state == "missing"
    message = read_items(task, tmp_path)
    assert message.startswith("task sentiment (tinydom) skipped: ")
    assert (
        f"{tmp_path / 'tiny' / 'sentences.txt'} not found; put tiny/sentences.txt (example.org/sentences) "
        f"under {tmp_path}"
    ) in message
    assert "hf:someone/not-mirrored" in message and "\n" not in message


def test_a_hub_dataset_without_the_declared_column_is_a_clear_error(mirror, tmp_path):
    task = sentiment_task(hub=HubDataset("someone/sentiment", config="strict", split="test", columns={"text": "body"}))
    with pytest.raises(
        SelfspecError, match=r"hf:someone/sentiment .*: no column 'body' \(columns: sentence, label, context\)"
    ):
        read_items(task, tmp_path)


def test_hub_and_row_reader_go_together():
    with pytest.raises(ValueError, match="hub and load_rows go together"):
        EvalTask("x", "d", "x.txt", load_lines, hub=HUB)


def test_json_data_files_keep_mixed_value_types(mirror):
    """A raw JSON file in a repository (as TAT-QA publishes it) loads with its nested, mixed-type answers."""
    repo = mirror / "someone" / "qa"
    repo.mkdir(parents=True)
    contexts = [{"table": {"uid": "t1"}, "questions": [{"answer": 12.5}, {"answer": ["a", "b"]}, {"answer": "x"}]}]
    (repo / "dev.json").write_text(json.dumps(contexts))
    found = find(
        DataSource("qa", "qa/dev.json", "CC BY 4.0", hub=HubDataset("someone/qa", data_files="dev.json")), None
    )
    assert found.rows == contexts


class SentimentPlugin:
    from selfspec_core.hookspecs import hookimpl

    @hookimpl
    def register_domains(self, register):
        from selfspec_core.records import Domain

        register(Domain(name="tinydom", description="tiny test domain", task_families=("sentiment",)))

    @hookimpl
    def evaluation_tasks(self, domain):
        if domain == "tinydom":
            return [sentiment_task(), sentiment_task(hub=HubDataset("someone/absent"))]

    @hookimpl
    def corpus_sources(self, domain):
        if domain == "tinydom":
            return [DataSource("tiny news", "tiny/news", "CC0", origin="example.org/news")]


def test_data_lists_and_fetches_per_domain(mirror, tmp_path, plugin):
    plugin(SentimentPlugin(), "sentiment-plugin")
    runner = CliRunner()
    listed = runner.invoke(cli, ["--domain", "tinydom", "--data-dir", str(tmp_path), "data"])
    assert listed.exit_code == 0, listed.output
    assert listed.output.splitlines()[0] == "tinydom"
    assert "  task sentiment: hub cache: hf:someone/sentiment config=strict split=test (CC BY 4.0)" in listed.output
    assert "  task sentiment: to fetch: hf:someone/absent split=train" in listed.output
    assert (
        f"  corpus tiny news: missing: {tmp_path / 'tiny' / 'news'} not found; put tiny/news (example.org/news)"
        in listed.output
    )
    fetched = runner.invoke(cli, ["--domain", "tinydom", "--data-dir", str(tmp_path), "data", "fetch"])
    assert fetched.exit_code != 0 and "2 could not be fetched" in str(fetched.exception)
    assert "task sentiment (tinydom): " in fetched.output and "not in the Hub mirror" in fetched.output
    assert "corpus tiny news (tinydom): " in fetched.output
