"""The one progress reporter: counts, rate and ETA; in place on a TTY, throttled lines otherwise."""

from __future__ import annotations

import io

import pytest

from loopcoder.utils import progress as P


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_in_place_on_a_tty_and_plain_lines_otherwise():
    tty = Tty()
    bar = P.Progress("train", 10, "steps", amount_unit="tokens", mode="auto", stream=tty)
    bar.update(1, 1000, rate=1000.0, info="loss 5.0000")
    bar.update(2, 2000, rate=1200.0, info="loss 4.5000")
    bar.close()
    text = tty.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and "train: 2/10 steps" in text and "ETA" in text
    plain = io.StringIO()
    lines = P.Progress("train", 10, "steps", amount_unit="tokens", mode="auto", every_s=3600, stream=plain)
    lines.update(1, 1000, rate=1000.0, info="loss 5.0000")
    lines.update(2, 2000, rate=1000.0, info="loss 4.5000")  # within every_s: not printed
    lines.update(10, 10000, rate=1000.0, info="loss 4.0000", force=True)
    out = plain.getvalue().splitlines()
    assert len(out) == 2 and "\r" not in plain.getvalue()
    assert out[0].startswith("train: 1/10 steps | 1.0k tokens | loss 5.0000 | 1.0k tok/s | ETA ")
    assert out[1].startswith("train: 10/10 steps") and out[1].endswith("ETA 0m00s")


def test_a_message_does_not_overwrite_the_bar():
    tty = Tty()
    bar = P.Progress("train", 4, "steps", mode="bar", stream=tty)
    bar.update(1)
    bar.message("checkpoint runs/x")
    assert tty.getvalue().endswith("\ncheckpoint runs/x\n")


def test_bytes_drive_the_eta_and_the_final_line_has_the_elapsed_time(monkeypatch):
    clock = iter([0.0, 10.0, 20.0])
    monkeypatch.setattr(P.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    p = P.Progress("encoding", unit="documents", amount_unit="bytes", total_amount=4_000_000, stream=out)
    p.advance(3, 1_000_000)  # 1 MB of 4 in 10 s: 30 s left
    assert p.finish() == 20.0
    first, last = out.getvalue().splitlines()
    assert first == "encoding: 3 documents | 1.0 MB/4.0 MB | 100.0 kB/s | ETA 0m30s"
    assert last == "encoding: 3 documents | 1.0 MB/4.0 MB | 50.0 kB/s | 20.0 s"


def test_items_rate_and_eta_count_only_work_since_the_start(monkeypatch):
    clock = iter([0.0, 30.0])
    monkeypatch.setattr(P.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    p = P.Progress("diagnose m", 100, "samples", start=40, stream=out)
    p.update(70, info="1234 tokens")  # 30 samples in 30 s, 30 left
    assert out.getvalue() == "diagnose m: 70/100 samples | 1234 tokens | 1.00 samples/s | ETA 0m30s\n"


def test_off_prints_nothing_and_bad_settings_are_refused():
    out = io.StringIO()
    p = P.Progress("x", 3, mode="off", stream=out)
    p.advance()
    p.message("hello")
    p.finish()
    assert out.getvalue() == "" and p.done == 1
    with pytest.raises(ValueError, match="mode"):
        P.Progress("x", mode="fast")
    with pytest.raises(ValueError, match="amount_unit"):
        P.Progress("x", amount_unit="lines")


def test_formatting_helpers():
    assert P.duration(65) == "1m05s" and P.duration(3725) == "1h02m" and P.duration(float("nan")) == "?"
    assert P.short_count(12) == "12" and P.short_count(12345) == "12.3k" and P.short_count(1234567) == "1.23M"
    assert P.human_bytes(999) == "999 B" and P.human_bytes(1500) == "1.5 kB" and P.human_bytes(2.5e9) == "2.5 GB"
