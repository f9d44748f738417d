"""The pretraining driver with Megatron-LM's document flags (issue 12, item 4).

``--reset-attention-mask --reset-position-ids --eod-mask-loss`` on GPT: documents end at the
byte-level corpus's EOD token; attention and positions restart there through cu_seqlens (the
micro-batch becomes one packed THD stream, ``training.data.pack_documents``), never through a
dense ``S x S`` mask.

* ``pack_documents`` keeps exactly Megatron's semantics: the pairs of real tokens its pieces
  let attend (same piece, causal) are those of megatron-core's dense
  ``_get_ltor_masks_and_position_ids`` mask, positions and loss mask are Megatron's, pads are
  loss-masked and come last in their piece.
* One step of the packed model equals megatron-core's own local attention with Megatron's
  dense document mask (float64, loss and every gradient), so the packing is Megatron's
  ``--reset-attention-mask``, not merely self-consistent.
* Convergence parity: training in float64 with all three flags at CP=2 repeats the CP=1 loss
  curve for every method (the padding unit is fixed at 4 in both runs, so both see the same
  packed stream), and the loss falls.
* Bad combinations are refused with the fix named.

The corpus is made of short documents (a few to ~200 bytes), so every 128-byte row holds
several document boundaries.
"""

from __future__ import annotations

import random

import pytest
import torch
from distributed import run_on_ranks

from megatron_seqpar.training import data
from megatron_seqpar.training.arguments import METHODS, ConfigError, TrainConfig, parse_args

DOCS = ("--reset-attention-mask", "--reset-position-ids", "--eod-mask-loss")
STEPS = 12
TINY = dict(model="gpt", num_layers=2, hidden_size=32, num_attention_heads=4,
            num_query_groups=2, seq_length=128, micro_batch_size=2, global_batch_size=2,
            train_iters=STEPS, lr=3e-3, lr_warmup_iters=2, min_lr=1e-4, seed=1234,
            progress_bar=False, plot=False, device="cpu", fp64=True,
            reset_attention_mask=True, reset_position_ids=True, eod_mask_loss=True)
# --fp64: parameters, activations and attention in float64; the CP=2 runs differ from CP=1
# only in the order of float64 sums (blockwise attention merged across ranks, gradient
# all-reduces), ~1e-16 relative each. One fp32 step remains: megatron-core's
# vocab_parallel_cross_entropy casts the logits to fp32, so a logit ~1e-15 away from an fp32
# rounding boundary (chance ~1e-8 per logit) can round the other way, moving that token's loss
# by ~1 fp32 ulp (5e-7) and the mean loss by ~2e-9. 1e-8 (relative to a loss near 5) allows a
# few such flips and Adam's growth over 12 steps, and is still 1e5 x below what a wrong mask
# or position does in one step (>= 1e-3).
TOL = 1e-8


def short_documents(n: int = 600, seed: int = 0) -> list[str]:
    """``n`` short documents (3-200 bytes) cut from Python's help topics."""
    rng = random.Random(seed)
    text = " ".join(" ".join(d.split()) for d in data.default_documents())
    out, at = [], 0
    for _ in range(n):
        length = rng.choice([3, 10, 40, 90, 200]) + rng.randrange(10)
        out.append(text[at:at + length])
        at += length
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packed")
    path = tmp / "short_docs.txt"
    path.write_text("\n\n\n".join(short_documents()) + "\n")  # read_documents splits at 2+ blanks
    return tmp, str(path)


# ----------------------------------------------------------------------------- packing
def _megatron_masks(row: torch.Tensor, reset_position_ids=True, eod_mask_loss=True):
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    return _get_ltor_masks_and_position_ids(row, data.EOD, reset_position_ids, True,
                                            eod_mask_loss, True)


@pytest.mark.parametrize("unit", [1, 4, 6])
def test_pack_documents_is_megatrons_document_mask(unit):
    g = torch.Generator().manual_seed(unit)
    b, s = 3, 40
    tokens = torch.randint(9, 256, (b, s), generator=g)
    tokens[0, [0, 5, 6, 39]] = data.EOD  # EOD first, twice in a row, last
    tokens[1, [17]] = data.EOD
    # row 2: no EOD at all (one piece of the whole row)
    rows = [_megatron_masks(tokens[r]) for r in range(b)]
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1),
             "loss_mask": torch.stack([m[1] for m in rows]),
             "position_ids": torch.stack([m[2] for m in rows])}
    packed = data.pack_documents(batch, unit=unit)
    cu, cu_pad = packed["cu_seqlens"].long(), packed["cu_seqlens_padded"].long()
    lengths, padded = cu.diff(), cu_pad.diff()
    assert lengths.tolist() == data.document_lengths(tokens)
    assert lengths.sum() == b * s and bool((padded % unit == 0).all())
    assert bool((padded - lengths < unit).all()) and bool((lengths > 0).all())
    assert packed["tokens"].shape == (1, int(cu_pad[-1]))
    assert int(packed["max_seqlen"][0]) == int(padded.max())
    # every real token lands at its piece's start + its offset; pads follow, loss-masked
    piece_of, real = torch.full((int(cu_pad[-1]),), -1), torch.zeros(int(cu_pad[-1]), dtype=bool)
    for i in range(lengths.numel()):
        piece_of[cu_pad[i]:cu_pad[i + 1]] = i
        real[cu_pad[i]:cu_pad[i] + lengths[i]] = True
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert torch.equal(packed[key][0, real], batch[key].reshape(-1).to(packed[key].dtype))
        assert bool((packed[key][0, ~real] == 0).all())
    # attention: (i, j) allowed by the packing iff same piece and j <= i, which must equal
    # Megatron's dense mask inside each row (rows are separate samples)
    stream = torch.arange(int(cu_pad[-1]))[real].reshape(b, s)
    for r in range(b):
        p = piece_of[stream[r]]
        ours = (p[:, None] == p[None, :]) & torch.ones(s, s, dtype=bool).tril()
        assert torch.equal(ours, ~rows[r][0][0]), f"row {r}"
    assert torch.equal(batch["loss_mask"][0, [0, 5, 6, 39]], torch.zeros(4))  # --eod-mask-loss


# ------------------------------------------------- one step: packed == Megatron's dense mask
def _packed_vs_dense(rank, world_size, corpus_path, cache):
    import warnings

    from megatron.core import parallel_state as ps

    from megatron_seqpar.cpu_workarounds import cpu_shims
    from megatron_seqpar.training import driver
    from megatron_seqpar.training.model import build_model, unwrap

    warnings.filterwarnings("ignore", category=UserWarning)
    base = dict(TINY, world_size=1, data_path=corpus_path, data_cache_path=cache,
                context_parallel_size=1)
    packed_cfg = TrainConfig(**dict(base, seqpar_method="lightseq", document_pad_multiple=4))
    dense_cfg = TrainConfig(**dict(base, reset_attention_mask=False))  # Megatron's local attn
    results = {}
    with cpu_shims():
        ps.initialize_model_parallel(1, 1, context_parallel_size=1)
        try:
            for name, cfg in (("dense", dense_cfg), ("packed", packed_cfg)):
                torch.manual_seed(cfg.seed)
                model, _, _ = build_model(cfg, "cpu")
                ds = data.build_train_dataset(cfg, data.prepare_data_prefix(cfg))
                batch = data.BatchSource(ds, cfg, 0, None, "cpu").get(0, 0)
                if name == "dense":  # Megatron's own mask: documents reset, [b, 1, s, s]
                    mask = torch.stack([_megatron_masks(row)[0] for row in batch["tokens"]])
                    losses = model(batch["tokens"], batch["position_ids"], mask,
                                   labels=batch["labels"])
                else:
                    losses = driver._forward(cfg, model, batch)
                mask = batch["loss_mask"].double()
                loss = (losses.double() * mask).sum() / mask.sum()
                loss.backward()
                grads = {n: p.main_grad.clone() for n, p in unwrap(model).named_parameters()}
                results[name] = (loss.item(), grads, int(batch["tokens"].numel()))
        finally:
            ps.destroy_model_parallel()
    return results


@pytest.mark.megatron
def test_packed_step_equals_megatron_dense_document_mask(corpus, tmp_path):
    tmp, path = corpus
    res = run_on_ranks(_packed_vs_dense, 1, path, str(tmp / "data"))[0]
    (dl, dg, dn), (pl, pg, pn) = res["dense"], res["packed"]
    assert pn > dn, "the packed stream carries pads (pieces rounded up to 4)"
    # float64 model, but megatron-core's cross entropy casts the logits to fp32 (see TOL):
    # logits that differ by ~1e-15 (LightSeq's blockwise fused kernel vs Megatron's one masked
    # softmax) round to the same fp32 value except near a rounding boundary. Measured:
    # equal losses, max grad diff 1.4e-15 x max |grad| (2026-11-30). A wrong mask or position moves
    # the loss by > 1e-3 and the gradients by O(1).
    print(f"packed vs dense: loss {pl!r} vs {dl!r}")
    assert abs(dl - pl) <= TOL * abs(dl), (dl, pl)
    assert dg.keys() == pg.keys()
    worst = 0.0
    for n in dg:
        scale = dg[n].abs().max().item() or 1.0
        err = (dg[n] - pg[n]).abs().max().item()
        worst = max(worst, err / scale)
        assert err <= 1e-8 * scale, f"{n}: {err} (max |grad| {scale})"
    print(f"packed vs dense: max grad diff {worst:.1e} x max |grad|")


# ------------------------------------------------------------ convergence parity CP=2 vs CP=1
def _train(rank, world_size, kwargs):
    import warnings

    from megatron_seqpar.cpu_workarounds import cpu_shims
    from megatron_seqpar.training import driver

    warnings.filterwarnings("ignore", category=UserWarning)
    cfg = TrainConfig(world_size=world_size, **kwargs)
    with cpu_shims():
        return driver.train(cfg, device="cpu", quiet=True)


@pytest.fixture(scope="module")
def cp1(corpus):
    tmp, path = corpus
    common = dict(TINY, data_path=path, data_cache_path=str(tmp / "data"),
                  document_pad_multiple=4)
    ref = run_on_ranks(_train, 1, dict(common, seqpar_method="lightseq",
                                       log_dir=str(tmp / "cp1")))[0]
    return common, ref, tmp


@pytest.mark.megatron
@pytest.mark.parametrize("method", METHODS)
def test_documents_cp2_match_cp1_and_learn(method, cp1):
    common, ref, tmp = cp1
    got = run_on_ranks(_train, 2, dict(common, context_parallel_size=2, seqpar_method=method,
                                       log_dir=str(tmp / method)))
    assert got[0] == got[1], "both CP ranks report the same all-reduced loss"
    worst = max(abs(a - b) for a, b in zip(ref, got[0]))
    print(f"documents {method}: CP=1 {ref[0]:.6f} -> {ref[-1]:.6f}, CP=2 {got[0][0]:.6f} -> "
          f"{got[0][-1]:.6f}, max |diff| over {STEPS} steps {worst:.1e}")
    assert len(got[0]) == len(ref) == STEPS
    for i, (a, b) in enumerate(zip(ref, got[0])):
        assert abs(a - b) <= TOL, f"step {i + 1}: CP=1 {a!r} vs CP=2 {b!r}"
    assert ref[-1] < ref[0] - 0.5, f"the model must learn: {ref}"


@pytest.fixture(scope="module")
def cp1_unpadded(cp1):
    """CP=1 on the stream without per-document padding (unit 1): what the balanced layout
    packs at any CP size (it needs only the stream to divide by CP)."""
    common, _, tmp = cp1
    common = dict(common, document_pad_multiple=None)
    ref = run_on_ranks(_train, 1, dict(common, seqpar_method="lightseq",
                                       log_dir=str(tmp / "cp1-unpadded")))[0]
    return common, ref, tmp


@pytest.mark.megatron
@pytest.mark.parametrize("method, cp, hcp", [(m, 2, None) for m in METHODS]
                         + [("lightseq", 4, None), ("lss", 4, (2, 2))])
def test_documents_balanced_match_cp1(method, cp, hcp, cp1_unpadded):
    """``--seqpar-packing balanced``: short documents whole on one rank, long ones split, no
    per-document padding; CP=2 (every method), CP=4 and CP=4 on two levels (head all-to-all
    over U=2, LSS over R=2) repeat the unpadded CP=1 curve (same tolerance as above)."""
    _balanced_matches(*cp1_unpadded, f"balanced-{method}-{cp}-{hcp}", cp, seqpar_method=method,
                      hierarchical_context_parallel_sizes=hcp)


def _balanced_matches(common, ref, tmp, label, cp, **flags):
    """A balanced run of ``common`` + ``flags`` at CP=``cp`` repeats the loss curve ``ref``."""
    got = run_on_ranks(_train, cp, dict(common, context_parallel_size=cp,
                                        seqpar_packing="balanced", log_dir=str(tmp / label),
                                        **flags))
    assert all(g == got[0] for g in got)
    worst = max(abs(a - b) for a, b in zip(ref, got[0]))
    print(f"documents {label} CP={cp}: CP=1 {ref[0]:.6f} -> {ref[-1]:.6f}, "
          f"max |diff| over {STEPS} steps {worst:.1e}")
    assert len(got[0]) == STEPS and worst <= TOL, (ref, got[0])


@pytest.mark.megatron
@pytest.mark.parametrize("layout", ["dp2xcp2", "tp2xcp2"])
def test_documents_world4_match_cp1(layout, cp1):
    """World 4: data parallel 2 x CP 2 (each DP rank packs its own row, so the ranks' streams
    differ in length; the loss is normalised by the global token count) and TP 2 x CP 2 (the
    packed stream through Megatron's tensor-parallel layers) repeat the CP=1 curve."""
    common, ref, tmp = cp1
    extra = (dict(micro_batch_size=1) if layout == "dp2xcp2"
             else dict(tensor_model_parallel_size=2))
    got = run_on_ranks(_train, 4, dict(common, context_parallel_size=2, seqpar_method="lightseq",
                                       log_dir=str(tmp / layout), **extra))
    assert all(g == got[0] for g in got)
    worst = max(abs(a - b) for a, b in zip(ref, got[0]))
    print(f"documents {layout} lightseq: max |diff| over {STEPS} steps {worst:.1e}")
    # TP=2: megatron-core's vocab-parallel cross entropy (fp32) takes the max and the sum of
    # exponentials over two vocabulary halves and all-reduces them, so every token's fp32 loss
    # may move by a few fp32 ulps (1 ulp = 4.8e-7 at a loss near 5), not just by rare
    # rounding flips. Measured 1.5e-8 over 12 steps (2026-11-30); 1e-6 bounds a few ulps and
    # is still 1e3 x below a wrong mask or position (>= 1e-3).
    assert worst <= (TOL if layout == "dp2xcp2" else 1e-6), (ref, got[0])


def test_log_records_packed_tokens(cp1):
    """The run log says how many stream slots (real + pad) each step used."""
    from megatron_seqpar.training import report

    _, _, tmp = cp1
    recs = report.step_records(str(tmp / "cp1" / report.LOG_NAME))
    real = TINY["global_batch_size"] * TINY["seq_length"]
    assert all(real <= r["packed_tokens"] < 2 * real for r in recs), recs[0]


# --------------------------------------------------------------------------- bad flags
@pytest.mark.parametrize("argv, model, match", [
    (["--reset-attention-mask"], "gpt", "add --seqpar-method"),
    (["--reset-position-ids"], "bert", "GPT flags"),
    (["--seqpar-method", "rsa", "--document-pad-multiple", "4"], "gpt",
     "needs --reset-attention-mask"),
    (["--seqpar-method", "rsa", "--reset-attention-mask", "--context-parallel-size", "2",
      "--document-pad-multiple", "6"], "gpt", "multiple of 2\\*CP = 4"),
    (["--seqpar-method", "lss", "--reset-position-ids", "--context-parallel-size", "2",
      "--no-seqpar-lss-assemble-position-grads"], "gpt", "drop --no-seqpar-lss-assemble"),
    (["--seqpar-method", "rsa", "--seqpar-packing", "balanced", "--context-parallel-size", "2"],
     "gpt", "add --reset-attention-mask"),
    (["--seqpar-method", "rsa", "--seqpar-packing", "balanced", "--reset-attention-mask",
      "--context-parallel-size", "2", "--position-embedding-type", "rope",
      "--multi-latent-attention"], "gpt", "balanced with --multi-latent-attention: not yet"),
])
def test_bad_document_flags(argv, model, match):
    world = 2 if "--context-parallel-size" in argv else 1
    with pytest.raises(ConfigError, match=match):
        parse_args(argv, model=model, world_size=world)


def test_document_flags_parse():
    cfg = parse_args(["--seqpar-method", "lss", *DOCS, "--context-parallel-size", "2"],
                     world_size=2)
    assert (cfg.reset_attention_mask, cfg.reset_position_ids, cfg.eod_mask_loss) == (
        True, True, True)
    from megatron_seqpar.training.arguments import document_unit

    assert document_unit(cfg) == 4
    balanced = parse_args(["--seqpar-method", "lss", *DOCS, "--context-parallel-size", "2",
                           "--seqpar-packing", "balanced", "--document-pad-multiple", "3"],
                          world_size=2)
    assert balanced.seqpar_packing == "balanced" and document_unit(balanced) == 3
    assert parse_args(["--eod-mask-loss", "--reset-position-ids"]).seqpar_method is None


@pytest.mark.megatron
def test_document_mask_changes_the_run(cp1):
    """Control: the same run without --reset-attention-mask (attention across documents) is
    another curve, so the parity above compares runs that really reset attention."""
    common, ref, tmp = cp1
    plain = {k: v for k, v in common.items() if k != "document_pad_multiple"}
    got = run_on_ranks(_train, 1, dict(plain, reset_attention_mask=False, seqpar_method=None,
                                       log_dir=str(tmp / "plain")))[0]
    assert max(abs(a - b) for a, b in zip(ref, got)) > 1e-3, (ref, got)


@pytest.mark.megatron
def test_documents_rope_cp2_match_cp1(cp1):
    """RoPE: megatron-core's THD path restarts rotary positions per packed sequence (relative
    positions inside a document are all attention sees, so --reset-position-ids changes
    nothing there); CP=2 repeats CP=1 (same tolerance as above)."""
    common, _, tmp = cp1
    rope = dict(common, position_embedding_type="rope", seqpar_method="lightseq")
    ref = run_on_ranks(_train, 1, dict(rope, log_dir=str(tmp / "rope1")))[0]
    got = run_on_ranks(_train, 2, dict(rope, context_parallel_size=2,
                                       log_dir=str(tmp / "rope2")))[0]
    worst = max(abs(a - b) for a, b in zip(ref, got))
    print(f"documents rope lightseq: CP=1 {ref[0]:.6f} -> {ref[-1]:.6f}, max |diff| {worst:.1e}")
    assert worst <= TOL and ref[-1] < ref[0] - 0.5, (ref, got)


@pytest.fixture(scope="module")
def rope_cp1(cp1_unpadded):
    """CP=1, RoPE rotated by megatron-core's own THD path (zigzag packing value: the model has
    megatron-core's RoPE), on the unpadded stream the balanced layout packs."""
    common, _, tmp = cp1_unpadded
    rope = dict(common, position_embedding_type="rope")
    ref = run_on_ranks(_train, 1, dict(rope, seqpar_method="lightseq",
                                       log_dir=str(tmp / "rope-cp1")))[0]
    return rope, ref, tmp


@pytest.mark.megatron
@pytest.mark.parametrize("method, cp", [("lightseq", 1)] + [(m, 2) for m in METHODS]
                         + [("lightseq", 4)])
def test_documents_balanced_rope_match_cp1(method, cp, rope_cp1):
    """``--seqpar-packing balanced --position-embedding-type rope``: the model is built without
    megatron-core's RoPE and our provider rotates q and k at each token's position in its
    document (``megatron.rope``; split documents continue their positions on the next rank).
    CP=1 (the provider's rotation against megatron-core's), CP=2 every method and CP=4 repeat
    megatron-core's CP=1 RoPE curve (same tolerance as above)."""
    _balanced_matches(*rope_cp1, f"balanced-rope-{method}-{cp}", cp, seqpar_method=method)
