"""Sequence parallelism (``parallel.sequence_parallel``): outside the tensor-parallel GEMMs every tp rank holds
seq_length / tp of the sequence, inside DeepSpeed's pipeline engine and with ZeRO 1 and 3. The same model is
computed: losses and gradient norms equal those without it (fp32, dropout on: the shard's dropout mask is the
whole tensor's, cut), the replicated parameters stay bit-identical across tp ranks (their gradients, partial
sums over sequence shards, are summed over tp), and the checkpoint exports and reshards like one without it."""

from __future__ import annotations

import pytest
import torch

from tests.dist_helper import run_distributed
from tests.helpers import DROPOUT, run_config

STEPS = 10
RTOL = 1e-5
# world -> (preset, tp, pp, zero): (tp, pp, dp) = (2,1,1), (2,2,1), (2,1,2) with ZeRO 1 and 3, (2,2,2)
LAYOUTS = {2: [(p, 2, 1, 1) for p in ("gpt2", "llama")],
           4: [(p, tp, pp, z) for p in ("gpt2", "llama") for tp, pp, z in [(2, 2, 1), (2, 1, 1), (2, 1, 3)]],
           8: [(p, 2, 2, 1) for p in ("gpt2", "llama")]}


def _runs(rank: int, world: int, root: str) -> dict:
    from mtnlg.training.loop import train

    out = {}
    for preset, tp, pp, zero in LAYOUTS[world]:
        for sp in (False, True):
            key = (preset, tp, pp, world // (tp * pp), zero, sp)
            cfg = run_config(preset, tp=tp, pp=pp, zero=zero, iters=STEPS, model=DROPOUT,
                             save=f"{root}/{'-'.join(map(str, key))}")
            cfg.parallel.sequence_parallel = sp
            summary = train(cfg)
            out[key] = {"losses": summary.losses, "grad_norms": summary.grad_norms, "save": cfg.checkpoint.save}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    out = {}
    for world in LAYOUTS:
        out.update(run_distributed(_runs, world, args=(str(root),))[0])
    return out


def _rel(a: dict[int, float], b: dict[int, float]) -> float:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


CASES = [(w, *run) for w, runs in LAYOUTS.items() for run in runs]


@pytest.mark.parametrize("world,preset,tp,pp,zero", CASES)
def test_sequence_parallel_computes_the_same_model(runs, world, preset, tp, pp, zero):
    from mtnlg.checkpoint import open_checkpoint

    dp = world // (tp * pp)
    off, on = runs[(preset, tp, pp, dp, zero, False)], runs[(preset, tp, pp, dp, zero, True)]
    loss, norm = _rel(on["losses"], off["losses"]), _rel(on["grad_norms"], off["grad_norms"])
    # replicated parameters (norms, row-parallel biases, positions) after 10 steps: the same bits on every tp rank
    ckpt = open_checkpoint(on["save"])
    replicated, differing = 0, []
    for group in ckpt.groups:
        shards = dict(ckpt.tp_shards(group))
        for local, sharding in group.params:
            if sharding.kind == "replicated":
                replicated += 1
                if not all(torch.equal(shards[0][local], shards[t][local]) for t in range(1, tp)):
                    differing.append(group.full(local))
    print(f"\n{preset} tp={tp} pp={pp} dp={dp} ZeRO-{zero}: SP vs not over {STEPS} steps: losses {loss:.1e}, "
          f"grad norms {norm:.1e}; {replicated} replicated parameters identical across tp: {not differing}")
    assert loss < RTOL and norm < RTOL
    assert replicated >= 2 * 4 + 1 and differing == []


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_sequence_parallel_checkpoint_exports_and_reshards_like_one_without(runs, preset, tmp_path):
    """tp=2 x pp=2 x dp=2: the HF export of the SP-trained checkpoint has the logits of the one trained without SP,
    and DeepSpeed's universal conversion (``mtnlg checkpoint reshard``) takes its replicated parameters once."""
    from mtnlg.checkpoint import full_state_dict, reshard
    from mtnlg.convert import export_hf
    from tests.helpers import load_hf

    on, off = runs[(preset, 2, 2, 2, 1, True)]["save"], runs[(preset, 2, 2, 2, 1, False)]["save"]
    ids = torch.randint(0, 96, (3, 32), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, ckpt in (("on", on), ("off", off)):
        export_hf(ckpt, tmp_path / name, verify=True)
        with torch.no_grad():
            logits[name] = load_hf(tmp_path / name)(input_ids=ids).logits
    diff = float((logits["on"] - logits["off"]).abs().max() / logits["off"].abs().max())
    uni = reshard(on, tmp_path / "universal", log=lambda *_: None)
    tag = next(uni.glob("global_step*"))
    merged = full_state_dict(on)
    worst = max(float((torch.load(tag / "zero" / n / "fp32.pt", weights_only=False)["param"] - w).abs().max())
                for n, w in merged.items())
    print(f"\n{preset}: HF logits of the SP-trained export vs without SP: {diff:.1e} (relative); universal "
          f"checkpoint vs the reader: {worst:.1e}")
    assert diff < RTOL and worst == 0.0
