"""Every rate in the report says what it measures: generation time or the whole run, batch share or not."""
from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
from conftest import FAST, cli, write_jsonl


class Cards(HTMLParser):
    """report.html's summary cards as {label: value}."""

    def __init__(self, text: str):
        super().__init__()
        self.cards: dict[str, str] = {}
        self._open: list[str] = []
        self._value = ""
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self._open.append(tag)

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        if self._open[-1:] == ["b"]:
            self._value = data
        elif self._open[-1:] == ["span"] and self._value:
            self.cards[data] = self._value
            self._value = ""


@pytest.fixture(scope="module")
def run_out(tmp_path_factory):
    folder = tmp_path_factory.mktemp("figures")
    manifest = write_jsonl(folder / "m.jsonl", [{"id": f"r{i}", "prompt": "a red circle", "seed": i} for i in range(4)])
    out = folder / "out"
    assert cli(manifest, *FAST, "--out", out, "--quiet", "--batch-size", "2") == 0
    return out


def test_totals_hold_both_rates(run_out):
    totals = json.loads((run_out / "report.json").read_text())["totals"]
    assert totals["generated"] == 4
    assert totals["wall_s"] > totals["generate_s"] > 0  # the whole run holds loading, generation does not
    assert totals["images_per_s"] == round(4 / totals["generate_s"], 4)
    assert totals["end_to_end_images_per_s"] == round(4 / totals["wall_s"], 4)
    assert totals["end_to_end_images_per_s"] < totals["images_per_s"]


def test_markdown_labels_each_rate_beside_its_time(run_out):
    totals = json.loads((run_out / "report.json").read_text())["totals"]
    md = (run_out / "report.md").read_text()
    header, _rule, row = [line for line in md.splitlines() if line.startswith("|")][:3]
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], [c.strip() for c in row.strip("|").split("|")]))
    assert cells["generate s"] == f"{totals['generate_s']:.2f}"
    assert cells["images/s (generation)"] == f"{totals['images_per_s']:.2f}"
    assert cells["wall s (whole run)"] == f"{totals['wall_s']:.2f}"
    assert cells["images/s (end to end)"] == f"{totals['end_to_end_images_per_s']:.2f}"
    assert "images/s (end to end) = made now ÷ wall s" in md
    assert "s/image p50 (batch s ÷ batch size)" in md and "not the latency of one image" in md
    assert "| wall s | images/s |" not in md  # the old, unlabelled pair


def test_html_cards_show_both_rates(run_out):
    totals = json.loads((run_out / "report.json").read_text())["totals"]
    cards = Cards((run_out / "report.html").read_text(encoding="utf-8")).cards
    assert cards["images/s (generation)"] == f"{totals['images_per_s']:.2f}"
    assert cards["images/s (end to end)"] == f"{totals['end_to_end_images_per_s']:.2f}"
    assert "wall time (whole run)" in cards and "generation time (no load, no warm-up)" in cards
    assert "batch s ÷ batch size" in (run_out / "report.html").read_text(encoding="utf-8")


def test_report_command_rebuilds_the_same_figures(run_out):
    before = json.loads((run_out / "report.json").read_text())["totals"]
    (run_out / "report.json").unlink()
    assert cli("report", run_out) == 0
    after = json.loads((run_out / "report.json").read_text())["totals"]
    assert after["end_to_end_images_per_s"] == before["end_to_end_images_per_s"]
    assert after["images_per_s"] == before["images_per_s"]
