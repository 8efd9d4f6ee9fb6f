"""Update schema: hash, flatten/unflatten round trips, shape and key errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.encryption import UpdateSchema
from privacy.errors import EncryptionError

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@settings(deadline=None, max_examples=30)
@given(entries=st.lists(shapes, min_size=1, max_size=5), seed=st.integers(0, 2**32 - 1))
def test_flatten_unflatten_round_trip(entries, seed):
    named = [(f"layer{i}.weight", shape) for i, shape in enumerate(entries)]
    if sum(int(np.prod(s)) for _, s in named) == 0:
        named.append(("bias", (1,)))
    schema = UpdateSchema(named)
    rng = np.random.default_rng(seed)
    update = {name: rng.normal(size=shape) for name, shape in named}
    flat = schema.flatten(update)
    assert flat.shape == (schema.size,)
    back = schema.unflatten(flat)
    assert list(back) == [n for n, _ in named]
    for name, value in update.items():
        np.testing.assert_array_equal(back[name], value)
    np.testing.assert_array_equal(schema.flatten(flat), flat)


def test_hash_depends_on_names_shapes_and_order():
    a = UpdateSchema([("a", (2, 3)), ("b", (4,))])
    assert a.hash == UpdateSchema([("a", (2, 3)), ("b", (4,))]).hash
    assert a.hash != UpdateSchema([("b", (4,)), ("a", (2, 3))]).hash
    assert a.hash != UpdateSchema([("a", (3, 2)), ("b", (4,))]).hash
    assert a.hash != UpdateSchema([("a", (2, 3)), ("c", (4,))]).hash


def test_torch_state_dict():
    model = torch.nn.Linear(3, 2)
    state = model.state_dict()
    schema = UpdateSchema.from_update(state)
    assert schema.entries == (("weight", (2, 3)), ("bias", (2,)))
    flat = schema.flatten(state)
    assert np.allclose(flat[:6], state["weight"].numpy().ravel())
    assert schema.flatten(dict(reversed(list(state.items())))).tolist() == flat.tolist()


def test_errors():
    schema = UpdateSchema([("a", (2,)), ("b", (3,))])
    with pytest.raises(EncryptionError, match="missing"):
        schema.flatten({"a": np.zeros(2)})
    with pytest.raises(EncryptionError, match="unknown"):
        schema.flatten({"a": np.zeros(2), "b": np.zeros(3), "c": np.zeros(1)})
    with pytest.raises(EncryptionError, match="shape"):
        schema.flatten({"a": np.zeros(2), "b": np.zeros((3, 1))})
    with pytest.raises(EncryptionError, match="expected"):
        schema.flatten(np.zeros(4))
    with pytest.raises(EncryptionError, match="unique"):
        UpdateSchema([("a", (1,)), ("a", (2,))])
    with pytest.raises(EncryptionError, match="at least one"):
        UpdateSchema([("a", (0,))])
    with pytest.raises(EncryptionError):
        UpdateSchema([("a", (-1,))])
