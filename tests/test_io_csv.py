"""`pagjax.io.write_csv`: a value is never dropped silently and an empty cell means None."""
import csv

import numpy as np
import pytest

from pagjax import io


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rows_with_exactly_the_columns_are_written_in_order(tmp_path):
    path = str(tmp_path / "r.csv")
    io.write_csv(path, [{"b": 1.5, "a": None, "c": True}, {"a": "x", "b": np.nan, "c": False}], ["a", "b", "c"])
    with open(path) as f:
        assert f.readline().strip() == "a,b,c"
    assert _read(path) == [{"a": "", "b": "1.5", "c": "true"}, {"a": "x", "b": "", "c": "false"}]


def test_an_unknown_column_is_an_error_naming_it(tmp_path):
    path = tmp_path / "r.csv"
    with pytest.raises(ValueError, match=r"row 1 has values for unknown columns \['new_metric'\]"):
        io.write_csv(str(path), [{"a": 1}, {"a": 2, "new_metric": 0.3}], ["a"])
    assert not path.exists()  # nothing half-written


def test_a_missing_column_is_an_error_naming_it(tmp_path):
    path = tmp_path / "r.csv"
    with pytest.raises(ValueError, match=r"row 0 lacks columns \['b'\]"):
        io.write_csv(str(path), [{"a": 1}], ["a", "b"])
    with pytest.raises(ValueError, match=r"columns repeat: \['a'\]"):
        io.write_csv(str(path), [{"a": 1}], ["a", "a"])
    assert not path.exists()
