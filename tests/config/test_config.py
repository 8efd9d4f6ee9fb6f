"""Config loading: overrides win, unknown keys and wrong types fail naming the key, with a hint."""

from __future__ import annotations

import pytest
import yaml

from fedrec.config import load_config
from fedrec.config.loader import apply_overrides, parse_override
from fedrec.errors import ConfigError
from fedrec.models.dlrm import DLRMConfig


def write(tmp_path, data, name="c.yml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


DLRM = {"model": {"name": "dlrm", "preproc": {"dataset": "criteo"}}}


def test_defaults_are_the_dlrm_kaggle_reference(tmp_path):
    cfg = load_config(write(tmp_path, DLRM))
    params = cfg.model.params
    assert isinstance(params, DLRMConfig)
    assert params.arch_mlp_bot == [13, 512, 256, 64, 16]
    assert params.arch_mlp_top == [367, 512, 256, 1]
    assert params.loss_function == "bce"


def test_cli_override_wins_over_file(tmp_path):
    data = {**DLRM, "train": {"lr": 0.5, "batch_size": 64}}
    cfg = load_config(write(tmp_path, data), ["train.lr=0.01", "model.preproc.synthetic.rows=123"])
    assert cfg.train.lr == 0.01
    assert cfg.train.batch_size == 64
    assert cfg.model.preproc.synthetic.rows == 123


def test_list_override_is_parsed(tmp_path):
    cfg = load_config(
        write(tmp_path, DLRM),
        ["model.arch_sparse_feature_size=8", "model.arch_mlp_bot=[13,32,8]", "model.arch_mlp_top=[359,16,1]"],
    )
    assert cfg.model.params.arch_mlp_bot == [13, 32, 8]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.arch_mlp_bott=[13,16]", "did you mean 'model.arch_mlp_bot'"),
        ("train.lrr=0.1", "did you mean 'train.lr'"),
        ("trian.lr=0.1", "did you mean 'train'"),
        ("model.preproc.datafle=x", "did you mean 'model.preproc.datafile'"),
    ],
)
def test_unknown_keys_are_errors_with_closest_key(tmp_path, override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, DLRM), [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.batch_size=abc", "train.batch_size' = 'abc': expected int"),
        ("train.batch_size=true", "expected int"),
        ("train.lr=-1", "train.lr"),
        ("model.arch_interaction_op=sum", "one of 'dot', 'cat'"),
        ("model.arch_mlp_bot=[13,512,256,64]", "last width must equal arch_sparse_feature_size (16)"),
        ("model.arch_mlp_top=[366,512,256,1]", "interaction output size (367"),
        ("model.arch_mlp_bot=[12,512,256,64,16]", "number of dense features (13)"),
        ("model.name=dlrn", "did you mean 'dlrm'"),
        ("model.preproc.dataset=movielens", "needs a click-through dataset"),
        ("model.embedding_scale=0", "model.embedding_scale' = 0.0: expected a finite number > 0"),
        ("model.embedding_scale=-2.5", "model.embedding_scale' = -2.5: expected a finite number > 0"),
        ("model.embedding_scale=abc", "model.embedding_scale"),
    ],
)
def test_bad_values_name_key_value_and_expectation(tmp_path, override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, DLRM), [override])
    assert needle in str(err.value)


def test_embedding_scale_reaches_the_model(tmp_path):
    cfg = load_config(write(tmp_path, DLRM), ["model.embedding_scale=4.5"])
    assert cfg.model.params.embedding_scale == 4.5


def test_cat_interaction_size_is_checked(tmp_path):
    cfg = load_config(
        write(tmp_path, DLRM), ["model.arch_interaction_op=cat", "model.arch_mlp_top=[432,64,1]"]
    )
    assert cfg.model.params.arch_mlp_top[0] == 27 * 16
    with pytest.raises(ConfigError, match="432"):
        load_config(write(tmp_path, DLRM), ["model.arch_interaction_op=cat"])


def test_interaction_itself_changes_expected_width(tmp_path):
    with pytest.raises(ConfigError, match="394"):
        load_config(write(tmp_path, DLRM), ["model.arch_interaction_itself=true"])


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("", "config file is empty"),
        ("- a\n- b\n", "expected a mapping"),
        ("model: [unclosed\n", "invalid YAML at line"),
    ],
)
def test_bad_files(tmp_path, content, needle):
    path = tmp_path / "bad.yml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=needle):
        load_config(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_non_utf8_config(tmp_path):
    path = tmp_path / "bin.yml"
    path.write_bytes(b"model:\n  name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_override_parsing():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=null") == (["a"], None)
    with pytest.raises(ConfigError):
        parse_override("novalue")
    with pytest.raises(ConfigError):
        parse_override("a..b=1")
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_shipped_configs_load(root):
    for name in ("dlrm.yml", "mf_movielens.yml"):
        load_config(root / "configs" / name)
