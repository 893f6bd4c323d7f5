"""`raymoe prepare-data` through click's CliRunner."""

from click.testing import CliRunner

from raymoe.cli import main
from raymoe.data import TokenDataset


def test_prepare_data_command(tmp_path):
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "one.md").write_text("# Title\nsome markdown ✓\n")
    (src / "nested" / "two.txt").write_text("plain text\n")
    out = tmp_path / "ds"
    runner = CliRunner()
    result = runner.invoke(
        main, ["prepare-data", str(src), "--out", str(out), "--glob", "*.md", "--glob", "*.txt", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "2 documents, 41 tokens" in result.output and "shard-00000.parquet" in result.output
    assert TokenDataset(out).num_tokens == len("# Title\nsome markdown ✓\n".encode()) + len("plain text\n") + 4

    again = runner.invoke(main, ["prepare-data", str(src), "--out", str(out)])
    assert again.exit_code == 1 and "is not empty" in again.output
    missing = runner.invoke(main, ["prepare-data", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 1 and "nope does not exist" in missing.output
    no_out = runner.invoke(main, ["prepare-data", str(src)])
    assert no_out.exit_code == 2 and "--out DIR is required" in no_out.output


def test_prepare_embedded_corpus_command(tmp_path):
    out = tmp_path / "embedded"
    result = CliRunner().invoke(
        main, ["prepare-data", "--embedded", "--byte-budget", "50000", "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert TokenDataset(out).info.tokenizer.name == "byte"
