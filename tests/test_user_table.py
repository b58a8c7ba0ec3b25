"""The PPD user table (t2i_align/users/table.py): lookups, interpolation, safetensors round trip, clear errors."""
import pytest
import torch
from safetensors.torch import save_file

from t2i_align.users import UnknownUserError, UserTable, UserTableError, interpolate_users, select_layers


def _table():
    # two users, 2 tokens of width 3; values chosen so every row is recognisable
    return UserTable.from_dict({7: torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
                                "alice": torch.tensor([[-1.0, 0.0, 1.0], [0.5, 0.5, 0.5]])})


def test_lookup_and_batch_tokens():
    table = _table()
    assert (len(table), table.num_tokens, table.dim, table.ids) == (2, 2, 3, (7, "alice"))
    assert 7 in table and "7" not in table
    batch = table.tokens(["alice", 7, "alice"], dtype=torch.float64)
    assert batch.shape == (3, 2, 3) and batch.dtype == torch.float64
    assert batch[1].tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    assert batch[0].tolist() == batch[2].tolist() == [[-1.0, 0.0, 1.0], [0.5, 0.5, 0.5]]


def test_interpolation_by_hand():
    e_a, e_b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    # 0.25 * [3, 6] + 0.75 * [1, 2] = [1.5, 3.0]
    assert interpolate_users(e_a, e_b, 0.25).tolist() == [1.5, 3.0]
    assert torch.equal(interpolate_users(e_a, e_b, 0.0), e_a)
    assert torch.equal(interpolate_users(e_a, e_b, 1.0), e_b)
    # table form: alpha = 0.5 between user 7 and alice, first token: 0.5 * [-1, 0, 1] + 0.5 * [1, 2, 3]
    assert _table().interpolate(7, "alice", 0.5)[0].tolist() == [0.0, 1.0, 2.0]
    half = interpolate_users(e_a.half(), e_b.half(), 0.25)
    assert half.dtype == torch.float16 and half.tolist() == [1.5, 3.0]
    with pytest.raises(UserTableError, match="shapes"):
        interpolate_users(e_a, torch.zeros(3), 0.5)


def test_save_load_round_trip_keeps_ids_and_dtype(tmp_path):
    table = UserTable([3, "bob", 12], torch.arange(3 * 4 * 5, dtype=torch.float16).reshape(3, 4, 5))
    path = table.save(tmp_path / "users.safetensors")
    loaded = UserTable.load(path, dim=5)
    assert loaded.ids == (3, "bob", 12)  # the int ids stay ints, the string stays a string
    assert loaded.embeddings.dtype == torch.float16 and torch.equal(loaded.embeddings, table.embeddings)
    assert loaded.embedding(12)[0, 0].item() == 40.0  # row 2 starts at 2 * 4 * 5


def test_unknown_user_names_the_id():
    with pytest.raises(UnknownUserError, match=r"user 'carol' is not in the user table \(2 users: 7, 'alice'\)"):
        _table().tokens([7, "carol"])


def test_construction_errors():
    with pytest.raises(UserTableError, match=r"user 'b' has an embedding of shape \(2, 4\), but user 'a' has \(2, 3\)"):
        UserTable.from_dict({"a": torch.zeros(2, 3), "b": torch.zeros(2, 4)})
    with pytest.raises(UserTableError, match="appears twice"):
        UserTable([1, 1], torch.zeros(2, 1, 3))
    with pytest.raises(UserTableError, match="2 ids but 3 embeddings"):
        UserTable([1, 2], torch.zeros(3, 1, 3))
    with pytest.raises(UserTableError, match="finite"):
        UserTable([1], torch.tensor([[[float("nan")]]]))
    with pytest.raises(UserTableError, match="ints or strings"):
        UserTable([True], torch.zeros(1, 1, 3))


def test_load_errors(tmp_path):
    path = _table().save(tmp_path / "users.safetensors")
    with pytest.raises(UserTableError, match="3 wide but the user branch expects 3584"):
        UserTable.load(path, dim=3584)
    with pytest.raises(FileNotFoundError, match="no user table"):
        UserTable.load(tmp_path / "missing.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserTableError, match="not a readable safetensors file"):
        UserTable.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"definitely not safetensors")
    with pytest.raises(UserTableError, match="not a readable safetensors file"):
        UserTable.load(garbage)
    other = tmp_path / "other.safetensors"
    save_file({"embeddings": torch.zeros(1, 1, 3)}, str(other))
    with pytest.raises(UserTableError, match="not a user table"):
        UserTable.load(other)


def test_select_layers_of_a_ppd_embedding():
    emb = torch.arange(29.0)[:, None].expand(29, 4)  # row i holds layer i
    assert select_layers(emb, "all").shape == (29, 4)
    assert select_layers(emb, "last")[:, 0].tolist() == [28.0]
    assert select_layers(emb, 3)[:, 0].tolist() == [26.0, 27.0, 28.0]
    with pytest.raises(UserTableError, match="1..29"):
        select_layers(emb, 30)
