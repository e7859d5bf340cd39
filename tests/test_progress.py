"""milora.progress: a bar on a terminal, plain lines (no carriage returns) in a log."""

from __future__ import annotations

import io

import pytest

from milora import progress as pg


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_follows_the_stream_and_the_override(monkeypatch):
    monkeypatch.delenv(pg.ENV, raising=False)
    assert pg.mode(io.StringIO()) == "plain" and pg.mode(Tty()) == "bar"
    monkeypatch.setenv(pg.ENV, "plain")
    assert pg.mode(Tty()) == "plain"
    monkeypatch.setenv(pg.ENV, "nonsense")  # unknown values fall back to the terminal test
    assert pg.mode(Tty()) == "bar"


def test_plain_mode_prints_a_coarse_line_every_n_steps_and_at_the_end(monkeypatch):
    monkeypatch.delenv(pg.ENV, raising=False)
    out = io.StringIO()
    bar = pg.Progress(25, "milora-train", "step", stream=out)
    assert bar.every == 2  # about PLAIN_LINES lines, whatever the total
    for i in range(25):
        bar.update(1, loss=f"{1 / (i + 1):.2f}")
    bar.write("step 25: dev loss 0.5")
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 12 + 1 + 1  # steps 2, 4, ..., 24, then 25, then the message
    assert lines[0].startswith("milora-train: 2/25 step, loss 0.50 (")
    assert lines[-2].startswith("milora-train: 25/25 step, loss 0.04")
    assert lines[-1] == "step 25: dev loss 0.5"


def test_every_total_prints_only_sub_steps_and_the_end(monkeypatch):
    monkeypatch.delenv(pg.ENV, raising=False)
    out = io.StringIO()
    with pg.Progress(3, "milora-export", "step", stream=out, every=3) as bar:
        for what in ("loading", "exporting prefill", "exporting decode"):
            bar.set_description(what)
            bar.update()
    assert out.getvalue().splitlines()[:3] == ["milora-export: loading", "milora-export: exporting prefill",
                                              "milora-export: exporting decode"]
    assert out.getvalue().splitlines()[3].startswith("milora-export: 3/3 step (")


@pytest.mark.parametrize("enabled,env", [(False, None), (True, "off")])
def test_disabled_progress_is_silent(monkeypatch, enabled, env):
    if env:
        monkeypatch.setenv(pg.ENV, env)
    else:
        monkeypatch.delenv(pg.ENV, raising=False)
    out = io.StringIO()
    bar = pg.Progress(4, "x", stream=out, enabled=enabled)
    for _ in range(4):
        bar.update()
    bar.write("hidden")
    bar.close()
    assert out.getvalue() == ""


def test_bar_mode_uses_tqdm_on_a_terminal(monkeypatch):
    monkeypatch.delenv(pg.ENV, raising=False)
    out = Tty()
    with pg.Progress(2, "eval", "q", stream=out) as bar:
        bar.update()
        bar.update()
    assert "eval" in out.getvalue() and "\r" in out.getvalue()
