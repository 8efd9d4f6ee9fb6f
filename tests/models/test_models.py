"""DLRM and MF: shapes, interaction sizes, loss choices, gradients reach every part."""

from __future__ import annotations

import copy

import pytest
import torch

from fedrec.errors import ConfigError
from fedrec.models.dlrm import DLRM, DLRMConfig, interaction_size
from fedrec.models.mf import MatrixFactorization, MFConfig
from privacy.dp.per_sample import CLIP_EPS, PerSampleClipper


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


def mf_with_reg(reg=0.1, reg_bias=0.3, dim=3):
    model = MatrixFactorization(
        MFConfig(embedding_dim=dim, init_std=0.5, reg=reg, reg_bias=reg_bias),
        num_users=2,
        num_items=3,
        global_mean=3.0,
        seed=4,
    )
    with torch.no_grad():
        model.user_bias.weight.copy_(torch.tensor([[0.2], [-0.4]]))
        model.item_bias.weight.copy_(torch.tensor([[0.1], [0.5], [-0.3]]))
    return model


def test_mf_regularisation_gradient_matches_hand_computation():
    reg, reg_bias = 0.1, 0.3
    model = mf_with_reg(reg, reg_bias)
    batch = {"user": torch.tensor([0, 1]), "item": torch.tensor([1, 1]), "label": torch.tensor([4.0, 2.0])}
    model.train()
    loss = model.loss(model(batch), batch["label"])
    loss.backward()
    with torch.no_grad():
        P, Q = model.user_embedding.weight, model.item_embedding.weight
        bu, bi = model.user_bias.weight[:, 0], model.item_bias.weight[:, 0]
        e = [3.0 + bu[u] + bi[1] + P[u] @ Q[1] - r for u, r in ((0, 4.0), (1, 2.0))]
        # mean over the 2 examples of (e_k^2 + reg (|p_u|^2 + |q_i|^2) + reg_bias (b_u^2 + b_i^2))
        expected_loss = (
            sum(
                e[k] ** 2 + reg * (P[k] @ P[k] + Q[1] @ Q[1]) + reg_bias * (bu[k] ** 2 + bi[1] ** 2)
                for k in (0, 1)
            )
            / 2
        )
        grad_p = torch.stack([e[k] * Q[1] + reg * P[k] for k in (0, 1)])  # (1/2) * 2 * (...)
        grad_q1 = sum(e[k] * P[k] + reg * Q[1] for k in (0, 1))
        grad_bu = torch.stack([e[k] + reg_bias * bu[k] for k in (0, 1)])
        grad_bi1 = sum(e[k] + reg_bias * bi[1] for k in (0, 1))
    torch.testing.assert_close(loss.detach(), expected_loss)
    torch.testing.assert_close(model.user_embedding.weight.grad, grad_p)
    torch.testing.assert_close(model.item_embedding.weight.grad[1], grad_q1)
    torch.testing.assert_close(model.user_bias.weight.grad[:, 0], grad_bu)
    torch.testing.assert_close(model.item_bias.weight.grad[1, 0], grad_bi1)
    # Rows no example touched get no gradient at all (unlike weight decay on the whole table).
    assert model.item_embedding.weight.grad[[0, 2]].abs().max() == 0
    assert model.item_bias.weight.grad[[0, 2]].abs().max() == 0


def test_mf_penalty_is_per_example_and_absent_in_evaluation():
    model = mf_with_reg()
    batch = {
        "user": torch.tensor([0, 1, 0]),
        "item": torch.tensor([2, 0, 1]),
        "label": torch.tensor([4.0, 2.0, 5.0]),
    }
    model.train()
    per_example = model.loss(model(batch), batch["label"], reduction="none")
    assert per_example.shape == (3,)
    for k in range(3):  # each example's loss is its own: the same as a batch of that example alone
        one = {name: t[k : k + 1] for name, t in batch.items()}
        torch.testing.assert_close(
            model.loss(model(one), one["label"], reduction="none"), per_example[k : k + 1]
        )
    model.eval()
    plain = model.loss(model(batch), batch["label"], reduction="none")
    torch.testing.assert_close(plain, (model(batch) - batch["label"]) ** 2)
    assert (per_example > plain).all()


def test_mf_regularisation_keeps_dp_per_sample_clipping_exact():
    model = mf_with_reg(reg=0.5, reg_bias=0.5)
    naive_model = copy.deepcopy(model)
    batch = {
        "user": torch.tensor([0, 1, 0, 1]),
        "item": torch.tensor([2, 0, 1, 2]),
        "label": torch.tensor([4.0, 2.0, 5.0, 1.0]),
    }
    model.train()
    naive_model.train()
    assert_clipping_matches_a_per_example_loop(model, naive_model, batch, clip=0.8)


def assert_clipping_matches_a_per_example_loop(model, naive_model, batch: dict, *, clip: float) -> None:
    """PerSampleClipper's norms and clipped gradient sum equal a loop over single examples of a copy."""
    got = PerSampleClipper(model, max_grad_norm=clip).clip(
        model.loss(model(batch), batch["label"], reduction="none")
    )
    params = [p for p in naive_model.parameters() if p.requires_grad]
    expected = [torch.zeros_like(p) for p in params]
    norms = []
    for k in range(len(batch["label"])):
        one = {name: t[k : k + 1] for name, t in batch.items()}
        grads = torch.autograd.grad(naive_model.loss(naive_model(one), one["label"], reduction="sum"), params)
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        norms.append(norm)
        factor = min(1.0, clip / (float(norm) + CLIP_EPS))
        for acc, g in zip(expected, grads):
            acc += factor * g
    torch.testing.assert_close(got.norms.float(), torch.stack(norms).float())
    for (name, p), want in zip([(n, p) for n, p in model.named_parameters() if p.requires_grad], expected):
        torch.testing.assert_close(got.to_dense(p), want, msg=name)


def test_mf_bad_regularisation_is_a_config_error():
    with pytest.raises(ConfigError, match="reg"):
        MFConfig(reg=-0.1).validate("model")


def scaled_dlrm(scale: float) -> DLRM:
    tables = (5, 7, 3)
    top_in = interaction_size("dot", len(tables) + 1, 4, False)
    cfg = DLRMConfig(
        arch_sparse_feature_size=4,
        arch_mlp_bot=[13, 8, 4],
        arch_mlp_top=[top_in, 8, 1],
        embedding_scale=scale,
    )
    return DLRM(cfg, table_sizes=list(tables), seed=0)


def test_embedding_scale_starts_from_the_same_vectors_and_stores_rows_divided_by_it():
    plain, scaled = scaled_dlrm(1.0), scaled_dlrm(4.0)
    data = batch()
    stored_plain = plain.sparse_arch.embedding.weight.detach()
    stored_scaled = scaled.sparse_arch.embedding.weight.detach()
    torch.testing.assert_close(stored_scaled, stored_plain / 4.0)
    torch.testing.assert_close(scaled.sparse_arch(data["sparse"]), plain.sparse_arch(data["sparse"]))
    torch.testing.assert_close(scaled(data), plain(data))


def test_embedding_scale_moves_the_vectors_by_scale_squared_per_sgd_step():
    """One SGD step on the stored rows moves the embedding vectors by scale^2 x lr x their gradient."""
    scale, lr = 3.0, 0.1
    plain, scaled = scaled_dlrm(1.0), scaled_dlrm(scale)
    data = batch()
    sparse = data["sparse"]
    for model in (plain, scaled):
        model.loss(model(data), data["label"]).backward()
    vectors_before = plain.sparse_arch(sparse).detach()
    with torch.no_grad():
        plain.sparse_arch.embedding.weight -= (scale**2 * lr) * plain.sparse_arch.embedding.weight.grad
        scaled.sparse_arch.embedding.weight -= lr * scaled.sparse_arch.embedding.weight.grad
    moved_plain = plain.sparse_arch(sparse).detach() - vectors_before
    moved_scaled = scaled.sparse_arch(sparse).detach() - vectors_before
    assert float(moved_plain.abs().max()) > 1e-4
    torch.testing.assert_close(moved_scaled, moved_plain)


def test_embedding_scale_keeps_dp_per_sample_clipping_exact():
    model = scaled_dlrm(5.0)
    naive_model = copy.deepcopy(model)
    assert_clipping_matches_a_per_example_loop(model, naive_model, batch(), clip=0.5)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True])
def test_bad_embedding_scale_is_a_config_error(bad):
    with pytest.raises(ConfigError, match=r"model\.embedding_scale"):
        DLRMConfig(embedding_scale=bad).validate("model")
