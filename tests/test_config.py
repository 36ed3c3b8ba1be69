"""Config validation: unknown keys get a did-you-mean, wrong types name the key."""
import pytest

from embtables.config import load_config
from embtables.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "data: {train: x}\n"),
                      ["embedding.compression.method=hash", "embedding.compression.ratio=10", "train.epochs=3"])
    assert cfg["embedding"]["compression"] == {"method": "hash", "ratio": 10}
    assert cfg["train"]["epochs"] == 3 and cfg["train"]["batch_size"] == 2048


def test_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.batchsize'.*did you mean 'batch_size'"):
        load_config(write(tmp_path, "data: {train: x}\ntrain: {batchsize: 10}\n"))
    with pytest.raises(ConfigError, match=r"'modle'.*did you mean 'model'"):
        load_config(write(tmp_path, "data: {train: x}\nmodle: {name: dlrm}\n"))


@pytest.mark.parametrize("text, key", [
    ("data: {train: x}\ntrain: {epochs: 0}\n", "train.epochs"),
    ("data: {train: x}\nmodel: {name: resnet}\n", "model.name"),
    ("data: {train: x}\nembedding: {compression: {ratio: 0.5}}\n", "embedding.compression.ratio"),
    ("model: {name: dlrm}\n", "data.train"),
    ("data: 3\n", "data"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_missing_file_and_bad_set(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(write(tmp_path, "data: {train: x}\n"), ["train.epochs"])


# --- issue 14: every value range-checked before anything is written --------------------------
@pytest.mark.parametrize("line, key, why", [
    ("embedding: {compression: {ratio: .inf}}", "embedding.compression.ratio", "finite number >= 1"),
    ("embedding: {compression: {ratio: abc}}", "embedding.compression.ratio", "finite number >= 1"),
    ("embedding: {features: {C1: {compression: {ratio: .nan}}}}", "embedding.features.C1.compression.ratio", "finite"),
    ("embedding: {backend: tpu}", "embedding.backend", "auto, cpu_fused, fbgemm, torch, triton"),
    ("embedding: {lr: abc}", "embedding.lr", "> 0"),
    ("embedding: {dim: 3, backend: fbgemm}", "embedding.dim", "multiple of 4"),
    ("train: {lr: -1}", "train.lr", "> 0"),
    ("train: {seed: abc}", "train.seed", "integer >= 0"),
    ("train: {seed: true}", "train.seed", "integer >= 0"),
    ("train: {checkpoint_every_steps: often}", "train.checkpoint_every_steps", "integer >= 0"),
    ("train: {checkpoint_every_steps: -1}", "train.checkpoint_every_steps", "integer >= 0"),
    ("train: {max_steps: 0}", "train.max_steps", "integer >= 1 or null"),
    ("train: {sharding: diagonal}", "train.sharding", "table_wise, column_wise"),
    ("train: {eval_batch_size: 0}", "train.eval_batch_size", "integer >= 1"),
    ("train: {weight_decay: -0.1}", "train.weight_decay", ">= 0"),
    ("model: {dropout: 2}", "model.dropout", "[0, 1)"),
    ("model: {bottom_mlp: [8, -1]}", "model.bottom_mlp", "positive integers"),
])
def test_every_value_has_its_range(tmp_path, line, key, why):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, f"data: {{train: x}}\n{line}\n"))
    assert f"'{key}'" in str(e.value) and why in str(e.value)


def test_exponent_without_a_dot_is_a_number(tmp_path):
    """YAML 1.1 reads 1e9 as a string; a ratio of 1e9 means the number."""
    cfg = load_config(write(tmp_path, "data: {train: x}\nembedding: {compression: {method: hash, ratio: 1e9}}\n"),
                      ["train.lr=5e-4"])
    assert cfg["embedding"]["compression"]["ratio"] == 1e9 and cfg["train"]["lr"] == 5e-4


def test_bad_value_on_the_command_line_is_one_error_line_and_writes_nothing(tmp_path, capsys):
    from embtables.pipelines.cli.main import main

    cfg = write(tmp_path, "data: {train: x}\nembedding: {compression: {method: hash, ratio: .inf}}\n")
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config key 'embedding.compression.ratio'") and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
