"""Series data: real registry series, CSV edge cases, chronological splits, the train-only scaler."""

from __future__ import annotations

import numpy as np
import pytest

from forecast.data import Scaler, SeriesError, chronological_splits, load_series, read_csv
from forecast.train import TrainConfig, prepare, resolved_preset


def test_real_series_from_the_mirror():
    co2 = load_series("co2")
    assert co2.values.shape == (2284, 1)
    assert int((~co2.observed).sum()) == 59  # SOURCES.md: 59 weeks without a value
    assert np.isfinite(co2.values).all()
    sun = load_series("sunspots")
    assert sun.values.shape == (309, 1) and sun.times[0] == "1700" and sun.times[-1] == "2008"


def test_test_horizons_of_the_issue():
    for name, test in (("co2", 104), ("sunspots", 30)):
        config = TrainConfig.of(dataset=name)
        series = load_series(name)
        prepared = prepare(series, resolved_preset(config.data, len(series.values)))
        assert prepared.splits.length - prepared.splits.test_start == test


def test_split_boundaries():
    s = chronological_splits(100, 20, 4)
    assert (s.valid_start, s.test_start, s.length) == (72, 80, 100)
    with pytest.raises(SeriesError, match="does not fit"):
        chronological_splits(10, 10, 2)


def test_scaler_is_fitted_on_train_only():
    series = load_series("sunspots")
    config = TrainConfig.of(dataset="sunspots")
    prepared = prepare(series, resolved_preset(config.data, 309))
    train = series.values[: prepared.splits.valid_start]
    assert prepared.scaler.mean == pytest.approx(train.mean(axis=0).tolist())
    assert prepared.scaler.mean != pytest.approx(series.values.mean(axis=0).tolist())
    back = prepared.scaler.inverse(prepared.scaler.transform(series.values))
    np.testing.assert_allclose(back, series.values)
    assert Scaler.fit(np.ones((5, 1))).std == [1.0]


def test_csv_missing_values_are_interpolated(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("t,a,b\n1,1.0,10\n2,,NA\n3,3.0,30\n4,4,40\n", encoding="utf-8")
    series = read_csv(path, "t", ["a", "b"])
    np.testing.assert_allclose(series.values[1], [2.0, 20.0])
    assert series.observed[1].tolist() == [False, False] and series.observed[0].all()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("t,v\n1,1\n2,abc\n", r"s.csv:3: column 'v': 'abc' is not a number"),
        ("t,v\n1,1\n2,2,5\n", r"s.csv:3: 3 fields, the header has 2"),
        ("t,v\n1,1\n3,2\n2,4\n", r"s.csv:4: time '2' does not come after '3'"),
        ("t,v\n1,1\n1,2\n", r"s.csv:3: time '1' does not come after '1'"),
        ("t,v\n1,1\n2,inf\n", r"s.csv:3: column 'v': 'inf' is not finite"),
        ("t,x\n1,1\n", r"no column 'v'"),
        ("", "empty file"),
    ],
)
def test_csv_bad_rows_are_named_by_line(tmp_path, text, message):
    path = tmp_path / "s.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SeriesError, match=message):
        read_csv(path, "t", ["v"])


def test_sine_presets_follow_the_notes():
    d2l, rnn = load_series("sine-d2l", 0), load_series("sine-rnn", 0)
    assert d2l.values.shape == (1000, 1) and rnn.values.shape == (200, 1)
    assert rnn.times[-1] == "19.9"
    noise = d2l.values[:, 0] - np.sin(0.01 * np.arange(1, 1001))
    assert 0.17 < noise.std() < 0.23
    np.testing.assert_array_equal(load_series("sine-d2l", 3).values, load_series("sine-d2l", 3).values)
