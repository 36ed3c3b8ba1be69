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
