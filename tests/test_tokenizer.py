"""tokenizer.json beside a checkpoint is loaded; batches are left-padded to match the model's convention."""

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

import emojax
from emojax.errors import CheckpointError
from emojax.models.config import ModelConfig

TEXTS = ["she smiled and waited by the window", "the rain kept falling", "he laughed"] * 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = HFTokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=60, special_tokens=["[PAD]", "[UNK]"]))
    path = tmp_path_factory.mktemp("tok") / "ckpt"
    cfg = ModelConfig(architecture="llama", vocab_size=tok.get_vocab_size(), d_model=16, n_layers=1, n_heads=2,
                      n_kv_heads=1, head_dim=8, d_mlp=24)
    emojax.random_model(cfg, tokenizer=emojax.Tokenizer(tok)).save(path)
    return path


def test_tokenizer_round_trip_and_left_padding(checkpoint):
    lm = emojax.load_model(checkpoint)
    assert lm.tokenizer is not None
    ids = lm.tokenizer.encode("the rain kept falling")
    assert lm.tokenizer.decode(ids) == "the rain kept falling"
    tokens, mask = lm.tokenizer.batch(["he laughed", "the rain kept falling"])
    assert tokens.shape == mask.shape == (2, len(ids))
    assert mask[0].tolist() == [0] * (len(ids) - 2) + [1, 1]  # left padding
    assert mask[1].all()
    # the padded row's real tokens equal the unpadded run
    padded = np.asarray(lm(tokens, mask).logits[0, -2:])
    alone = np.asarray(lm(np.asarray([lm.tokenizer.encode("he laughed")]), None).logits[0])
    np.testing.assert_allclose(padded, alone, atol=1e-5)


def test_truncation_keeps_the_end(checkpoint):
    lm = emojax.load_model(checkpoint)
    full = lm.tokenizer.encode("she smiled and waited by the window")
    tokens, mask = lm.tokenizer.batch(["she smiled and waited by the window"], length=3)
    assert tokens[0].tolist() == full[-3:] and mask.all()


def test_corrupt_tokenizer_is_named(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "ckpt"
    shutil.copytree(checkpoint, bad)
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json: cannot read tokenizer"):
        emojax.load_model(bad)
