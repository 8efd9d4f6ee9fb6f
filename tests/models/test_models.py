"""DLRM and MF: shapes, interaction sizes, loss choices, gradients reach every part."""

from __future__ import annotations

import pytest
import torch

from fedrec.models.dlrm import DLRM, DLRMConfig, interaction_size
from fedrec.models.mf import MatrixFactorization, MFConfig


def small_dlrm(op="dot", itself=False, loss="bce", sparse=False, tables=(5, 7, 3)):
    dim = 4
    top_in = interaction_size(op, len(tables) + 1, dim, itself)
    cfg = DLRMConfig(
        arch_sparse_feature_size=dim,
        arch_mlp_bot=[13, 8, dim],
        arch_mlp_top=[top_in, 8, 1],
        arch_interaction_op=op,
        arch_interaction_itself=itself,
        loss_function=loss,
    )
    return DLRM(cfg, table_sizes=list(tables), seed=0, sparse=sparse)


def batch(n=6, tables=(5, 7, 3)):
    g = torch.Generator().manual_seed(1)
    return {
        "dense": torch.rand(n, 13, generator=g),
        "sparse": torch.stack([torch.randint(0, t, (n,), generator=g) for t in tables], dim=1),
        "label": torch.randint(0, 2, (n,), generator=g).float(),
    }


def test_interaction_sizes_match_reference():
    assert interaction_size("dot", 27, 16, False) == 367  # the Kaggle reference top MLP input
    assert interaction_size("dot", 27, 16, True) == 16 + 27 * 28 // 2
    assert interaction_size("cat", 27, 16, False) == 432


@pytest.mark.parametrize("op", ["dot", "cat"])
@pytest.mark.parametrize("itself", [False, True])
def test_dlrm_forward_and_backward(op, itself):
    model = small_dlrm(op, itself)
    b = batch()
    scores = model(b)
    assert scores.shape == (6,)
    loss = model.loss(scores, b["label"])
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_dot_interaction_equals_explicit_pairs():
    model = small_dlrm()
    b = batch()
    dense = model.dense_arch(b["dense"])
    emb = model.sparse_arch(b["sparse"])
    out = model.interaction(dense, emb)
    vectors = [dense, *emb.unbind(1)]
    pairs = [(vectors[i] * vectors[j]).sum(1) for i in range(len(vectors)) for j in range(i)]
    expected = torch.cat([dense, torch.stack(pairs, 1)], 1)
    torch.testing.assert_close(out, expected)


def test_bce_uses_logits_and_mse_uses_probabilities():
    b = batch()
    bce = small_dlrm(loss="bce")
    s = bce(b)
    torch.testing.assert_close(
        bce.loss(s, b["label"]), torch.nn.functional.binary_cross_entropy(torch.sigmoid(s), b["label"])
    )
    mse = small_dlrm(loss="mse")
    s = mse(b)
    torch.testing.assert_close(mse.loss(s, b["label"]), ((torch.sigmoid(s) - b["label"]) ** 2).mean())


def test_sparse_gradients_for_embeddings():
    model = small_dlrm(sparse=True)
    b = batch()
    model.loss(model(b), b["label"]).backward()
    assert model.sparse_arch.embedding.weight.grad.is_sparse
    assert not model.over_arch[0].weight.grad.is_sparse


def test_same_seed_same_init():
    a, b = small_dlrm(), small_dlrm()
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na


def test_mf_prediction_is_biased_dot_product():
    model = MatrixFactorization(MFConfig(embedding_dim=3), num_users=4, num_items=5, global_mean=3.5, seed=0)
    with torch.no_grad():
        model.user_bias.weight[1] = 0.25
        model.item_bias.weight[2] = -0.5
    users, items = torch.tensor([1]), torch.tensor([2])
    pred = model({"user": users, "item": items})
    dot = (model.user_embedding.weight[1] * model.item_embedding.weight[2]).sum()
    torch.testing.assert_close(pred, (3.5 + 0.25 - 0.5 + dot).reshape(1))
    scores = model.score_items(users, torch.tensor([[2, 0]]))
    torch.testing.assert_close(scores[0, 0], pred[0])
    assert MatrixFactorization.PRIVATE_PARAMETERS == ("user_embedding.weight", "user_bias.weight")


def test_mf_predict_clips_to_rating_range():
    model = MatrixFactorization(MFConfig(), num_users=2, num_items=2, rating_range=(1.0, 5.0))
    torch.testing.assert_close(model.predict(torch.tensor([0.0, 7.0, 3.0])), torch.tensor([1.0, 5.0, 3.0]))


def test_fused_tables_keep_their_rows_and_refuse_indices_outside_them():
    model = small_dlrm()
    b = batch()
    emb = model.sparse_arch(b["sparse"])
    for t in range(3):  # feature t reads its own table's rows of the fused weight
        torch.testing.assert_close(emb[:, t], model.sparse_arch.table(t)[b["sparse"][:, t]])
    bad = b["sparse"].clone()
    bad[2, 1] = 7  # table 1 has rows 0..6: row 7 would be table 2's row 0
    with pytest.raises(IndexError, match="sparse feature 1 = 7 in example 2: expected 0 to 6"):
        model(dict(b, sparse=bad))
    bad[2, 1] = -1
    with pytest.raises(IndexError, match="sparse feature 1 = -1"):
        model(dict(b, sparse=bad))
