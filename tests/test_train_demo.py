"""`gcvimoe demo`: trains on the digits, validates the best checkpoint and writes a report that points at its plots."""
import re

import pytest

from gcvimoe.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_writes_report_with_plots(tmp_path, capsys):
    output = tmp_path / "demo"
    assert main(["demo", "--output", str(output), "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"demo: report {output / 'report.md'}" in printed

    report = (output / "report.md").read_text()
    top1 = float(re.search(r"validation top-1 \(best checkpoint, epoch 1\) \| \*\*([\d.]+) %", report).group(1))
    assert 10.0 < top1 <= 100.0  # one epoch already beats chance (10 %) on the digits
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (output / image).is_file(), image
    assert "train/curves.png" in report and "expert_usage_best.png" in report
    assert (output / "train" / "expert_usage.png").is_file()  # the last epoch's, under another name than the best's
    assert (output / "train" / "best.pth").is_file()
