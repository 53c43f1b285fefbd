"""DistillationLoss against fixed, precomputed values (torchdistill style), DeiT's reference formula,
bf16 autocast, the hard/soft/none modes, soft targets, label smoothing and argument validation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill import DistillationLoss, LossTerms

# ------------------------------------------------------------------------------------ fixed inputs
# Two samples, three classes. The expected numbers below were computed by hand (numpy, float64), not
# with the code under test:
#   log_softmax(z) = z - log(sum(exp(z)))
#   CE            = mean_i(-log_softmax(S_CLS)[i, Y[i]])
#   CE, ls=0.1    = mean_i(0.9 * -log_softmax(S_CLS)[i, Y[i]] + 0.1 * mean_c(-log_softmax(S_CLS)[i, c]))
#   KL(tau=2)     = sum_{i,c} p_t * (log p_t - log p_s), p = softmax(z / 2)
#   soft batchmean = KL * 4 / 2;  soft deit = KL * 4 / (2 * 3)
#   hard          = mean_i(-log_softmax(S_DIST)[i, argmax T[i]]),  argmax T = [0, 2]
# e.g. row 0 of CE: log(e^1 + e^2 + e^0.5) - 2 = log(11.7563) - 2 = 0.46436.
S_CLS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
S_DIST = [[0.5, 1.5, -0.5], [2.0, 0.0, 1.0]]
T_LOGITS = [[2.0, 0.0, 1.0], [0.0, 1.0, 4.0]]
Y = [1, 2]
TAU = 2.0
ALPHA = 0.3

CE = 0.265126343932687
CE_LS01 = 0.4234596772660204
SOFT_BATCHMEAN = 1.3622352515858664
SOFT_DEIT = 0.4540784171952888
HARD = 1.4076059644443804


def fixed():
    return (torch.tensor(S_CLS), torch.tensor(S_DIST)), torch.tensor(T_LOGITS), torch.tensor(Y)


def approx(value: float):
    return pytest.approx(value, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------------------------ fixed values
@pytest.mark.parametrize(
    "mode, kl_reduction, distill",
    [
        ("soft", "batchmean", SOFT_BATCHMEAN),
        ("soft", "deit", SOFT_DEIT),
        ("hard", "batchmean", HARD),
        ("hard", "deit", HARD),  # kl_reduction does not touch the hard term
    ],
)
def test_fixed_values(mode, kl_reduction, distill):
    student, teacher, y = fixed()
    terms = DistillationLoss(mode, alpha=ALPHA, tau=TAU, kl_reduction=kl_reduction)(student, teacher, y)
    assert isinstance(terms, LossTerms)
    assert terms.ce.item() == approx(CE)
    assert terms.distill.item() == approx(distill)
    assert terms.total.item() == approx((1 - ALPHA) * CE + ALPHA * distill)


@pytest.mark.parametrize("kl_reduction", ["batchmean", "deit"])
def test_fixed_values_mode_none(kl_reduction):
    student, teacher, y = fixed()
    for t in (teacher, None):  # no teacher is needed without distillation
        terms = DistillationLoss("none", alpha=ALPHA, tau=TAU, kl_reduction=kl_reduction)(student, t, y)
        assert terms.ce.item() == approx(CE)
        assert terms.total.item() == approx(CE)  # alpha is not used
        assert terms.distill.item() == 0.0


def test_fixed_value_label_smoothing():
    student, teacher, y = fixed()
    terms = DistillationLoss("soft", alpha=ALPHA, tau=TAU, label_smoothing=0.1)(student, teacher, y)
    assert terms.ce.item() == approx(CE_LS01)
    assert terms.distill.item() == approx(SOFT_BATCHMEAN)


def test_default_kl_reduction_is_batchmean():
    student, teacher, y = fixed()
    terms = DistillationLoss("soft", tau=TAU)(student, teacher, y)
    assert terms.distill.item() == approx(SOFT_BATCHMEAN)


# --------------------------------------------------------------------------------- reference formulas
def deit_reference(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """facebookresearch/deit losses.py, distillation_type == 'soft'."""
    return F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1), reduction="sum", log_target=True) * (
        T * T
    ) / s.numel()


def batchmean_reference(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1), reduction="batchmean", log_target=True) * (
        T * T
    )


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0, 7.0])
@pytest.mark.parametrize("shape", [(1, 2), (8, 10), (5, 100)])
def test_soft_matches_reference_formulas(tau, shape):
    g = torch.Generator().manual_seed(int(tau * 10) + shape[1])
    s_cls, s_dist, t = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    y = torch.randint(0, shape[1], (shape[0],), generator=g)
    deit = DistillationLoss("soft", alpha=0.5, tau=tau, kl_reduction="deit")((s_cls, s_dist), t, y).distill
    bm = DistillationLoss("soft", alpha=0.5, tau=tau, kl_reduction="batchmean")((s_cls, s_dist), t, y).distill
    assert deit.item() == pytest.approx(deit_reference(s_dist, t, tau).item(), rel=1e-6, abs=1e-6)
    assert bm.item() == pytest.approx(batchmean_reference(s_dist, t, tau).item(), rel=1e-6, abs=1e-6)
    # batchmean divides by B, deit by B x C: exactly a factor num_classes apart
    assert bm.item() == pytest.approx(deit.item() * shape[1], rel=1e-6, abs=1e-9)


def test_soft_term_is_zero_for_identical_logits_and_positive_otherwise():
    z = torch.randn(4, 6)
    loss = DistillationLoss("soft", alpha=1.0, tau=2.0)
    assert loss((z, z), z, torch.zeros(4, dtype=torch.long)).distill.item() == pytest.approx(0.0, abs=1e-6)
    assert loss((z, z), z + torch.randn(4, 6), torch.zeros(4, dtype=torch.long)).distill.item() > 1e-3


# ------------------------------------------------------------------------------------------ bf16
@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("tau", [0.1, 1.0, 4.0])
def test_bf16_autocast_gradients_are_finite(mode, tau):
    g = torch.Generator().manual_seed(0)
    B, D, C = 16, 8, 10
    features = torch.randn(B, D, generator=g)
    w_cls = (torch.randn(D, C, generator=g) * 40).requires_grad_()  # logits of magnitude ~100
    w_dist = (torch.randn(D, C, generator=g) * 40).requires_grad_()
    teacher_logits = (torch.randn(B, C, generator=g) * 200).bfloat16()  # very sharp teacher
    y = torch.randint(0, C, (B,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_cls, z_dist = features @ w_cls, features @ w_dist
        assert z_cls.dtype == torch.bfloat16  # the test really runs in bf16
        terms = DistillationLoss(mode, alpha=0.5, tau=tau, kl_reduction="deit")((z_cls, z_dist), teacher_logits, y)
    assert torch.isfinite(terms.total) and torch.isfinite(terms.distill) and torch.isfinite(terms.ce)
    terms.total.backward()
    for w in (w_cls, w_dist):
        assert w.grad is not None and torch.isfinite(w.grad).all()
        assert w.grad.abs().sum() > 0
    # And the value agrees with the float32 computation on the same bf16 logits.
    ref = DistillationLoss(mode, alpha=0.5, tau=tau, kl_reduction="deit")(
        (z_cls.detach().float(), z_dist.detach().float()), teacher_logits.float(), y
    )
    assert terms.total.item() == pytest.approx(ref.total.item(), rel=1e-4, abs=1e-4)


# ------------------------------------------------------------------------------------------ hard
def test_hard_uses_teacher_argmax():
    g = torch.Generator().manual_seed(1)
    z_cls, z_dist, t = (torch.randn(6, 5, generator=g) for _ in range(3))
    y = torch.randint(0, 5, (6,), generator=g)
    terms = DistillationLoss("hard", alpha=0.5)((z_cls, z_dist), t, y)
    expected = F.cross_entropy(z_dist, t.argmax(1))
    assert terms.distill.item() == pytest.approx(expected.item(), rel=1e-6)
    # not the cross-entropy against the teacher's soft probabilities
    soft_ce = F.cross_entropy(z_dist, t.softmax(1))
    assert abs(terms.distill.item() - soft_ce.item()) > 1e-3
    # only the argmax matters: rescaling the teacher logits changes nothing
    assert DistillationLoss("hard")((z_cls, z_dist), t * 10 + 3, y).distill.item() == pytest.approx(expected.item(), rel=1e-6)
    # and the hard term reads the distillation head, not the class head
    assert abs(terms.distill.item() - F.cross_entropy(z_cls, t.argmax(1)).item()) > 1e-3


def test_hard_term_is_not_label_smoothed():
    student, teacher, y = fixed()
    smoothed = DistillationLoss("hard", alpha=ALPHA, label_smoothing=0.3)(student, teacher, y)
    assert smoothed.distill.item() == approx(HARD)


# ---------------------------------------------------------------------------------- soft targets
@pytest.mark.parametrize("mode", ["none", "soft", "hard"])
def test_soft_targets_accepted(mode):
    g = torch.Generator().manual_seed(2)
    B, C = 4, 5
    z_cls, z_dist, t = (torch.randn(B, C, generator=g) for _ in range(3))
    labels = torch.tensor([0, 3, 1, 4])
    lam = 0.7  # mixup of each sample with the batch flipped, as timm's Mixup does
    one_hot = F.one_hot(labels, C).float()
    soft = lam * one_hot + (1 - lam) * one_hot.flip(0)
    loss = DistillationLoss(mode, alpha=0.4, tau=2.0)
    terms = loss((z_cls, z_dist), t, soft)
    expected_ce = -(soft * z_cls.log_softmax(1)).sum(1).mean()
    assert terms.ce.item() == pytest.approx(expected_ce.item(), rel=1e-6)
    # one-hot probabilities give exactly the class-index loss
    assert loss((z_cls, z_dist), t, one_hot).ce.item() == pytest.approx(
        loss((z_cls, z_dist), t, labels).ce.item(), rel=1e-6
    )
    # the distillation term does not depend on the targets
    assert terms.distill.item() == pytest.approx(loss((z_cls, z_dist), t, labels).distill.item(), rel=1e-6)


def test_soft_targets_with_label_smoothing():
    z = torch.tensor(S_CLS)
    one_hot = F.one_hot(torch.tensor(Y), 3).float()
    terms = DistillationLoss("none", label_smoothing=0.1)(z, None, one_hot)
    assert terms.ce.item() == approx(CE_LS01)


# ------------------------------------------------------------------------------- label smoothing
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_label_smoothing_only_changes_ground_truth_term(mode):
    g = torch.Generator().manual_seed(3)
    z_cls, z_dist, t = (torch.randn(8, 7, generator=g) * 2 for _ in range(3))
    y = torch.randint(0, 7, (8,), generator=g)
    values = {
        ls: DistillationLoss(mode, alpha=0.5, tau=3.0, label_smoothing=ls)((z_cls, z_dist), t, y)
        for ls in (0.0, 0.1, 0.4)
    }
    for ls, terms in values.items():
        assert terms.distill.item() == pytest.approx(values[0.0].distill.item(), rel=1e-7)
        lp = z_cls.log_softmax(1)
        expected = ((1 - ls) * -lp[torch.arange(8), y] + ls * -lp.mean(1)).mean()
        assert terms.ce.item() == pytest.approx(expected.item(), rel=1e-6)
    assert values[0.4].ce.item() != pytest.approx(values[0.0].ce.item(), rel=1e-3)


# --------------------------------------------------------------------------------- single tensor
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_single_tensor_student_uses_same_logits_for_both_terms(mode):
    g = torch.Generator().manual_seed(4)
    z, other, t = (torch.randn(6, 4, generator=g) for _ in range(3))
    y = torch.randint(0, 4, (6,), generator=g)
    loss = DistillationLoss(mode, alpha=0.5, tau=2.0)
    single = loss(z, t, y)
    pair = loss((z, z), t, y)
    for a, b in zip(single, pair):
        assert a.item() == pytest.approx(b.item(), rel=1e-7)
    # a different distillation head would give a different distillation term
    assert abs(loss((z, other), t, y).distill.item() - single.distill.item()) > 1e-4
    # Hinton KD: the distillation term reads `z`
    if mode == "soft":
        assert single.distill.item() == pytest.approx(batchmean_reference(z, t, 2.0).item(), rel=1e-6)
    else:
        assert single.distill.item() == pytest.approx(F.cross_entropy(z, t.argmax(1)).item(), rel=1e-6)


# ----------------------------------------------------------------------------------------- total
@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_total_is_weighted_sum(mode, alpha):
    g = torch.Generator().manual_seed(5)
    z_cls, z_dist, t = (torch.randn(5, 6, generator=g) for _ in range(3))
    y = torch.randint(0, 6, (5,), generator=g)
    terms = DistillationLoss(mode, alpha=alpha, tau=2.0)((z_cls, z_dist), t, y)
    assert terms.ce.item() == pytest.approx(F.cross_entropy(z_cls, y).item(), rel=1e-6)
    assert terms.total.item() == pytest.approx((1 - alpha) * terms.ce.item() + alpha * terms.distill.item(), rel=1e-6)
    assert terms.distill.item() > 0  # the unweighted term is returned even when alpha = 0


def test_gradients_reach_only_the_weighted_heads():
    z_cls = torch.randn(4, 3, requires_grad=True)
    z_dist = torch.randn(4, 3, requires_grad=True)
    t, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    DistillationLoss("soft", alpha=1.0, tau=2.0)((z_cls, z_dist), t, y).total.backward()
    assert z_cls.grad.abs().max() == 0  # alpha = 1: the class head gets nothing
    assert z_dist.grad.abs().max() > 0


def test_missing_teacher_logits_is_an_error():
    student, _, y = fixed()
    with pytest.raises(ValueError, match="teacher_logits"):
        DistillationLoss("soft")(student, None, y)


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(mode="medium"), "mode"),
        (dict(mode="Soft"), "mode"),
        (dict(kl_reduction="mean"), "kl_reduction"),
        (dict(kl_reduction="sum"), "kl_reduction"),
        (dict(alpha=-0.1), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=math.nan), "alpha"),
        (dict(tau=0.0), "tau"),
        (dict(tau=-1.0), "tau"),
        (dict(tau=math.nan), "tau"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        DistillationLoss(**kwargs)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_bounds_are_inclusive(alpha):
    assert DistillationLoss(alpha=alpha).alpha == alpha


def test_config_round_trips():
    loss = DistillationLoss("soft", alpha=0.2, tau=3.0, kl_reduction="deit", label_smoothing=0.1)
    again = DistillationLoss(**loss.config())
    assert again.config() == loss.config() == dict(
        mode="soft", alpha=0.2, tau=3.0, kl_reduction="deit", label_smoothing=0.1
    )


@pytest.mark.parametrize("mode,tau", [("soft", 2.0), ("hard", 1.0)])
def test_agrees_with_timm_token_distillation_task(mode, tau):
    """Our loss equals timm's own DeiT token-distillation task (timm.task.TokenDistillationTask) on the
    same student, teacher and batch: total and both terms, to 1e-6."""
    token_task = pytest.importorskip("timm.task.token_distillation")
    from distill import build_student, build_teacher

    torch.manual_seed(0)
    student = build_student(num_classes=7, img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=1,
                            num_heads=2, drop_path_rate=0.0)
    teacher = build_teacher("cifar_resnet10", num_classes=7, in_chans=3).eval()
    mean, std = student.pretrained_cfg["mean"], student.pretrained_cfg["std"]
    teacher.pretrained_cfg.update(mean=mean, std=std)  # same normalisation: timm's input adapter is a no-op
    task = token_task.TokenDistillationTask(student, teacher, distill_type=mode, task_loss_weight=0.5,
                                            temperature=tau, verbose=False)
    task.train()
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 7, (6,))
    theirs = task(x, y)
    with torch.no_grad():
        z_t = teacher(x)
    ours = DistillationLoss(mode, alpha=0.5, tau=tau, kl_reduction="batchmean")(student(x), z_t, y)
    torch.testing.assert_close(ours.ce, theirs["task_loss"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.distill, theirs["distill_loss"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.total, theirs["loss"], atol=1e-6, rtol=1e-6)
