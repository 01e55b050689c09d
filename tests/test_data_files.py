"""How data file arguments (`--data-files`, `--train_file`) are split and expanded into files."""

import pytest

from clipcap_hf.data.prepare import expand_data_files


@pytest.mark.parametrize("given", [",", "", " , "])
def test_an_argument_naming_no_file_is_refused(given):
    with pytest.raises(FileNotFoundError, match=r"names no data file; give files, folders or glob patterns\.$"):
        expand_data_files(given)


def test_a_double_star_pattern_matches_files_at_any_depth(tmp_path):
    # As `datasets` resolves it: one folder level was read before, the others left out silently.
    for name in ("top.parquet", "a/x.parquet", "a/b/y.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = expand_data_files(f"{tmp_path}/**/*.parquet")
    assert found == [f"{tmp_path}/{name}" for name in ("a/b/y.parquet", "a/x.parquet", "top.parquet")]
