import os

import pytest

from orchestrator.spec.paths import absolute_path, absolute_sqlite, anchor_spec_paths, is_relative_sqlite, sqlite_file


@pytest.mark.parametrize("value, expected", [
    ("store", "/spec/dir/store"),
    ("./store", "/spec/dir/store"),
    ("../store", "/spec/store"),
    ("/abs/store", "/abs/store"),
    ("~/store", "~/store"),             # expanded where it is opened, never re-rooted
    ("s3://bucket/prefix", "s3://bucket/prefix"),
    ("file:///abs", "file:///abs"),
])
def test_absolute_path_roots_only_relative_paths(value, expected):
    assert absolute_path(value, "/spec/dir") == expected


@pytest.mark.parametrize("uri, expected", [
    ("sqlite:///mlflow.db", "sqlite:////spec/dir/mlflow.db"),
    ("sqlite:///../mlflow.db", "sqlite:////spec/mlflow.db"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ("sqlite:///~/mlflow.db", "sqlite:///~/mlflow.db"),
    ("sqlite:///:memory:", "sqlite:///:memory:"),
    ("http://mlflow:5000", "http://mlflow:5000"),
    ("postgresql://u@db/mlflow", "postgresql://u@db/mlflow"),
])
def test_absolute_sqlite_roots_only_relative_databases(uri, expected):
    assert absolute_sqlite(uri, "/spec/dir") == expected
    assert is_relative_sqlite(uri) == (uri != expected)


def test_sqlite_file():
    assert str(sqlite_file("sqlite:////a/b.db")) == "/a/b.db"
    assert str(sqlite_file("sqlite:///b.db?mode=rw")) == "b.db"
    assert sqlite_file("sqlite:///:memory:") is None and sqlite_file("http://x") is None


def test_anchor_spec_paths_touches_paths_and_nothing_else():
    data = {"name": "s", "store": {"root": "out"}, "tracking": {"uri": "sqlite:///t.db", "experiment": "e"},
            "datasets": [{"name": "d", "data_root": "raw"}, {"name": "e"}, "not a mapping"]}
    anchored = anchor_spec_paths(data, "/w/configs")
    assert anchored == {"name": "s", "store": {"root": "/w/configs/out"},
                        "tracking": {"uri": "sqlite:////w/configs/t.db", "experiment": "e"},
                        "datasets": [{"name": "d", "data_root": "/w/configs/raw"}, {"name": "e"}, "not a mapping"]}
    assert data["store"] == {"root": "out"}  # the input is not modified
    assert anchor_spec_paths({"store": 3, "tracking": None}, "/w") == {"store": 3, "tracking": None}


def test_relative_base_is_taken_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_path("s", "configs") == os.path.join(str(tmp_path), "configs", "s")
