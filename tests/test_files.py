import pytest

from tfvae.files import atomic_path


def test_atomic_path_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
  target = tmp_path / "sub" / "result.json"
  with atomic_path(target) as temporary:
    assert temporary.parent == target.parent and temporary.name.startswith(".")
    assert temporary.suffix == ".json"
    temporary.write_text("first")
  assert target.read_text() == "first"
  with pytest.raises(RuntimeError, match="crash"):
    with atomic_path(target) as temporary:
      temporary.write_text("half")
      raise RuntimeError("crash mid-write")
  assert target.read_text() == "first"
  assert [p.name for p in target.parent.iterdir()] == ["result.json"]
