"""Length tables: string ids kept as str, numeric ids as int64, per-sample total_tokens."""

import builtins

import numpy as np
import pytest

from mmtrain.data.lengths import load_length_table

ROWS = [("GCC_train_002582585", 1, 256, 40), ("GCC_train_000000017", 3, 768, 12), ("00042", 0, 0, 7)]


def _csv(tmp_path, rows, name="t.csv"):
    p = tmp_path / name
    p.write_text("id,tiles,image_tokens,text_tokens\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return p


@pytest.fixture(params=["pyarrow", "numpy"])
def reader(request, monkeypatch):
    if request.param == "numpy":  # force the no-pyarrow CSV fast path
        real = builtins.__import__

        def fake(name, *a, **k):
            if name.startswith("pyarrow"):
                raise ImportError(name)
            return real(name, *a, **k)

        monkeypatch.setattr(builtins, "__import__", fake)
    return request.param


def test_string_ids_kept_as_str(tmp_path, reader):
    t = load_length_table(_csv(tmp_path, ROWS))
    assert t.ids.dtype == object
    assert t.ids.tolist() == ["GCC_train_002582585", "GCC_train_000000017", "00042"]
    assert t.lengths.tolist() == [296, 780, 7] and t.tiles.tolist() == [1, 3, 0]
    assert t.total_tokens.tolist() == [296, 780, 7]
    assert int(t.total_tokens.sum()) == 1083


def test_numeric_ids_stay_int(tmp_path, reader):
    t = load_length_table(_csv(tmp_path, [(7, 1, 256, 40), (9, 2, 512, 3)]))
    assert t.ids.dtype == np.int64 and t.ids.tolist() == [7, 9]
    assert t.total_tokens.dtype == np.int64 and t.total_tokens.tolist() == [296, 515]


def test_no_id_column_is_row_number(tmp_path):
    p = tmp_path / "n.csv"
    p.write_text("tiles,image_tokens,text_tokens\n1,256,1\n2,512,2\n")
    t = load_length_table(p)
    assert t.ids.tolist() == [0, 1] and t.total_tokens.tolist() == [257, 514]


def test_parquet_and_npy_string_ids(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tbl = pa.table({"id": [r[0] for r in ROWS], "tiles": [r[1] for r in ROWS],
                    "image_tokens": [r[2] for r in ROWS], "text_tokens": [r[3] for r in ROWS]})
    pq.write_table(tbl, tmp_path / "t.parquet")
    t = load_length_table(tmp_path / "t.parquet")
    assert t.ids.tolist() == [r[0] for r in ROWS] and t.total_tokens.tolist() == [296, 780, 7]
    a = np.array([(r[0], r[2], r[3]) for r in ROWS], dtype=[("id", "U32"), ("image_tokens", "i8"), ("text_tokens", "i8")])
    np.save(tmp_path / "t.npy", a)
    t = load_length_table(tmp_path / "t.npy")
    assert t.ids.dtype == object and t.ids.tolist()[0] == "GCC_train_002582585"


def test_bad_length_column_message(tmp_path):
    p = tmp_path / "b.csv"
    p.write_text("id,image_tokens,text_tokens\na,256,x\n")
    with pytest.raises(ValueError, match="text_tokens"):
        load_length_table(p)
