"""Our driver with today's attention: 30 GPT steps at CP=2 repeat the CP=1 loss curve.

Windows + sinks (``--window-size 32,0 --window-attn-skip-freq 2 --softmax-type learnable``):
CP=1 is megatron-core's own local attention (no ``--seqpar-method``), CP=2 every method. MLA
(``--multi-latent-attention``): megatron-core's local attention takes no separate V head dim, so
CP=1 runs our provider too (LightSeq on a group of one: plain local attention), CP=2 every
method. Tolerance and its reasoning: ``test_training_parity`` (fp32 sums in another order).
"""

from __future__ import annotations

import pytest
from distributed import run_on_ranks
from test_training_parity import STEPS, TINY, TOL, _check, _train

from megatron_seqpar.training.arguments import METHODS, ConfigError, TrainConfig

FEATURES = {
    "window": dict(window_size=(32, 0), window_attn_skip_freq=2, softmax_type="learnable"),
    "mla": dict(multi_latent_attention=True, kv_lora_rank=16, qk_head_dim=16,
                qk_pos_emb_head_dim=8, v_head_dim=24, num_query_groups=None),
}
CP1_METHOD = {"window": None, "mla": "lightseq"}


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("windows")
    out = {}
    for name, extra in FEATURES.items():
        common = dict(TINY, model="gpt", seq_length=128, data_cache_path=str(tmp / "data"),
                      **extra)
        out[name] = run_on_ranks(_train, 1, dict(common, seqpar_method=CP1_METHOD[name],
                                                 log_dir=str(tmp / f"ref-{name}")))[0]
    return tmp, out


@pytest.mark.megatron
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("method", METHODS)
def test_cp2_matches_cp1(method, feature, refs):
    tmp, ref = refs
    common = dict(TINY, model="gpt", seq_length=128, data_cache_path=str(tmp / "data"),
                  **FEATURES[feature])
    cp2 = run_on_ranks(_train, 2, dict(common, context_parallel_size=2, seqpar_method=method,
                                       log_dir=str(tmp / f"{feature}-{method}")))
    assert cp2[0] == cp2[1]
    worst = _check(ref[feature], cp2[0], TOL["gpt"])
    print(f"gpt {feature} {method}: max |loss(CP=2) - loss(CP=1)| over {STEPS} steps = "
          f"{worst:.2e}")


@pytest.mark.parametrize("kw, fix", [
    (dict(multi_latent_attention=True), "needs --seqpar-method"),
    (dict(model="bert", multi_latent_attention=True, seqpar_method="rsa"), "for GPT"),
    (dict(window_size=(5, -2)), "ints >= -1"),
    (dict(window_attn_skip_freq=2), "needs --window-size"),
    (dict(softmax_type="sparse"), "--softmax-type"),
])
def test_bad_attention_flags_name_the_fix(kw, fix):
    with pytest.raises(ConfigError, match=fix):
        TrainConfig(**{**TINY, "seq_length": 128, **kw})


def test_window_flags_parse():
    from megatron_seqpar.training.arguments import parse_args

    cfg = parse_args(["--window-size", "64,0", "--window-attn-skip-freq", "2", "--softmax-type",
                      "learnable", "--seq-length", "128"], world_size=1)
    assert (cfg.window_size, cfg.window_attn_skip_freq, cfg.softmax_type) == ((64, 0), 2,
                                                                               "learnable")
    assert parse_args(["--window-size", "(8, -1)"], world_size=1).window_size == (8, -1)
