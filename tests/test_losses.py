"""DistillationLoss against fixed, precomputed values (torchdistill style), DeiT's reference formula,
bf16 autocast, the hard/soft/none modes, soft targets, label smoothing and argument validation; then the
DKD, DIST and logit-standardisation terms against the authors' formulas (see the second half)."""
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
    """label_smoothing smooths the ground-truth CE only; the hard term stays the plain CE against the
    teacher's argmax. Not on `fixed()`: there each teacher label's logit is its row's mean logit, where
    smoothing changes nothing."""
    g = torch.Generator().manual_seed(3)
    z_cls, z_dist, t = (torch.randn(6, 5, generator=g) for _ in range(3))
    y = torch.randint(0, 5, (6,), generator=g)
    terms = DistillationLoss("hard", alpha=ALPHA, label_smoothing=0.3)((z_cls, z_dist), t, y)
    plain = F.cross_entropy(z_dist, t.argmax(1)).item()
    assert abs(F.cross_entropy(z_dist, t.argmax(1), label_smoothing=0.3).item() - plain) > 1e-2  # it would show
    assert terms.distill.item() == pytest.approx(plain, rel=1e-6)
    assert terms.ce.item() == pytest.approx(F.cross_entropy(z_cls, y, label_smoothing=0.3).item(), rel=1e-6)


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
    """alpha 0 and 1 are accepted and leave one term alone, against the hand-computed values above:
    at 0 the ground truth's CE (no teacher needed), at 1 the soft term, with no gradient to the class head."""
    (s_cls, s_dist), t, y = fixed()
    s_cls.requires_grad_(True)
    loss = DistillationLoss("soft", alpha=alpha, tau=TAU)
    terms = loss((s_cls, s_dist), t if alpha else None, y)
    assert terms.total.item() == approx(SOFT_BATCHMEAN if alpha else CE)
    terms.total.backward()
    assert (s_cls.grad.abs().max() == 0) == (alpha == 1.0)


def test_config_round_trips():
    loss = DistillationLoss("soft", alpha=0.2, tau=3.0, kl_reduction="deit", label_smoothing=0.1)
    again = DistillationLoss(**loss.config())
    assert again.config() == loss.config() == dict(
        mode="soft", alpha=0.2, tau=3.0, kl_reduction="deit", label_smoothing=0.1, standardize=False,
        dkd_alpha=1.0, dkd_beta=8.0, dkd_warmup_epochs=0, dist_beta=1.0, dist_gamma=1.0, ce_reduction="labeled",
    )


def test_config_of_older_checkpoints_still_loads():
    """Checkpoints written before the DKD/DIST options hold only the five original keys."""
    old = dict(mode="soft", alpha=0.2, tau=3.0, kl_reduction="deit", label_smoothing=0.1)
    loss = DistillationLoss(**old)
    assert {k: loss.config()[k] for k in old} == old
    assert loss.config()["standardize"] is False


@pytest.mark.parametrize("mode,tau", [("soft", 2.0), ("hard", 1.0)])
def test_agrees_with_timm_token_distillation_task(mode, tau):
    """Our loss equals timm's own DeiT token-distillation task (timm.task.TokenDistillationTask) on the
    same student, teacher and batch: total and both terms, to 1e-6."""
    # not skipped: the dev extra requires timm >= 1.0.25, the first release with timm.task.token_distillation
    from timm.task import token_distillation as token_task
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


# ==================================================================================================
# DKD, DIST and logit standardisation
# ==================================================================================================
# Reference implementations: each restates, operation by operation, the authors' published code (float64,
# probabilities then torch.log, probability-target kl_div, the 1000.0 mask), independently of
# distill/losses.py.
def ref_standardize(z: torch.Tensor) -> torch.Tensor:
    """sunshangquan/logit-standardization-KD, mdistiller/distillers/KD.py (and DKD.py), `normalize`."""
    return (z - z.mean(dim=-1, keepdim=True)) / (1e-7 + z.std(dim=-1, keepdim=True))


def ref_kd(s: torch.Tensor, t: torch.Tensor, T: float, logit_stand: bool) -> torch.Tensor:
    """sunshangquan/logit-standardization-KD, mdistiller/distillers/KD.py, `kd_loss`."""
    if logit_stand:
        s, t = ref_standardize(s), ref_standardize(t)
    per_sample = F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="none").sum(1)
    return per_sample.mean() * T**2


def ref_dkd_parts(s, t, y, T: float, logit_stand: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) of megvii-research/mdistiller, mdistiller/distillers/DKD.py, `dkd_loss` (with its
    `_get_gt_mask`, `_get_other_mask`, `cat_mask`); `logit_stand` as in logit-standardization-KD's
    DKD.py. `size_average=False` there is `reduction="sum"`."""
    if logit_stand:
        s, t = ref_standardize(s), ref_standardize(t)
    gt = torch.zeros_like(s).scatter_(1, y.reshape(-1, 1), 1).bool()
    other = ~gt

    def two_bins(p):
        return torch.cat([(p * gt).sum(1, keepdim=True), (p * other).sum(1, keepdim=True)], dim=1)

    p_s, p_t = two_bins(F.softmax(s / T, dim=1)), two_bins(F.softmax(t / T, dim=1))
    tckd = F.kl_div(torch.log(p_s), p_t, reduction="sum") * T**2 / y.shape[0]
    p_t2 = F.softmax(t / T - 1000.0 * gt, dim=1)
    log_p_s2 = F.log_softmax(s / T - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_p_s2, p_t2, reduction="sum") * T**2 / y.shape[0]
    return tckd, nckd


def ref_dkd(s, t, y, T, alpha, beta, logit_stand=False):
    tckd, nckd = ref_dkd_parts(s, t, y, T, logit_stand)
    return alpha * tckd + beta * nckd


def ref_dist(z_s, z_t, beta: float, gamma: float, tau: float) -> torch.Tensor:
    """hunto/image_classification_sota (the `classification` submodule of hunto/DIST_KD),
    lib/models/losses/dist_kd.py, `DIST.forward` with `cosine_similarity`, `pearson_correlation`,
    `inter_class_relation`, `intra_class_relation`."""

    def pearson(a, b, eps=1e-8):
        a, b = a - a.mean(1).unsqueeze(1), b - b.mean(1).unsqueeze(1)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    y_s, y_t = (z_s / tau).softmax(dim=1), (z_t / tau).softmax(dim=1)
    inter = tau**2 * (1 - pearson(y_s, y_t).mean())
    intra = tau**2 * (1 - pearson(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean())
    return beta * inter + gamma * intra


# Fixed inputs: four samples, five classes; targets 2 and 0 are not the teacher's argmax (0 and 4), so
# the target-class split differs from the teacher's top class. Pinned values computed once with numpy
# (float64) from the papers' definitions, independently of both torch implementations:
#   softmax, z-score with ddof=1 and 1e-7, KL = sum p_t log(p_t / p_s) * T^2 / B,
#   TCKD on [p(target), 1 - p(target)], NCKD on the softmax renormalised over the non-target classes,
#   DIST: T^2 * (1 - mean row Pearson + 1 - mean column Pearson) of softmax(z / T), eps 1e-8.
S4 = [[1.0, -0.5, 2.0, 0.3, -1.2], [0.2, 1.7, -0.8, 0.9, 0.0], [-1.0, 0.4, 0.6, 2.2, -0.3], [0.8, 0.1, -1.5, -0.2, 1.4]]
T4 = [[2.5, -1.0, 1.0, 0.0, -2.0], [-0.5, 3.0, -1.0, 1.5, 0.5], [-2.0, 0.0, 1.5, 1.0, -1.0], [1.0, -0.5, -2.0, 0.5, 3.0]]
Y4 = [2, 1, 3, 0]
TCKD_T4 = 0.10558402263195356
NCKD_T4 = 0.3407733818459526
DKD_T4 = 2.8317710773995746  # TCKD + 8 * NCKD
DKD_LS_T2 = 0.6485237219134152  # standardised, T = 2, alpha 1, beta 8
KD_LS_T2 = 0.12155485780108846  # standardised soft KL, T = 2, batchmean
KD_T2 = 0.38705924833687166
DIST_T1 = 0.6368388355104236  # inter 0.35946559378317267 + intra 0.277373241727251
DIST_T4 = 4.783204573790933  # 16 * (0.17530960305443444 + 0.12364068280749885)


def fixed4(dtype=torch.float32):
    return torch.tensor(S4, dtype=dtype), torch.tensor(T4, dtype=dtype), torch.tensor(Y4)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(mode="dkd", tau=4.0), DKD_T4),  # DKD's CIFAR defaults: alpha 1, beta 8, T 4
        (dict(mode="dkd", tau=4.0, dkd_alpha=1.0, dkd_beta=0.0), TCKD_T4),
        (dict(mode="dkd", tau=4.0, dkd_alpha=0.0, dkd_beta=1.0), NCKD_T4),
        (dict(mode="dkd", tau=2.0, standardize=True), DKD_LS_T2),
        (dict(mode="soft", tau=2.0, standardize=True), KD_LS_T2),
        (dict(mode="soft", tau=2.0), KD_T2),
        (dict(mode="dist", tau=1.0), DIST_T1),
        (dict(mode="dist", tau=4.0), DIST_T4),
    ],
)
def test_new_terms_fixed_values(kwargs, expected):
    s, t, y = fixed4()
    terms = DistillationLoss(alpha=0.3, **kwargs)(s, t, y)
    assert terms.distill.item() == approx(expected)
    assert terms.ce.item() == approx(F.cross_entropy(s.double(), y).item())
    assert terms.total.item() == approx(0.7 * terms.ce.item() + 0.3 * expected)


def test_reference_implementations_reproduce_pinned_values():
    """The transcriptions of the authors' code agree with the numpy values: both sides are pinned."""
    s, t, y = fixed4(torch.float64)
    tckd, nckd = ref_dkd_parts(s, t, y, 4.0)
    assert tckd.item() == approx(TCKD_T4) and nckd.item() == approx(NCKD_T4)
    assert ref_dkd(s, t, y, 4.0, 1.0, 8.0).item() == approx(DKD_T4)
    assert ref_dkd(s, t, y, 2.0, 1.0, 8.0, logit_stand=True).item() == approx(DKD_LS_T2)
    assert ref_kd(s, t, 2.0, logit_stand=True).item() == approx(KD_LS_T2)
    assert ref_kd(s, t, 2.0, logit_stand=False).item() == approx(KD_T2)
    assert ref_dist(s, t, 1.0, 1.0, 1.0).item() == approx(DIST_T1)
    assert ref_dist(s, t, 1.0, 1.0, 4.0).item() == approx(DIST_T4)


def random_logits(seed: int, shape, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    s, t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale for _ in range(2))
    y = torch.randint(0, shape[1], (shape[0],), generator=g)
    return s, t, y


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("weights", [(1.0, 8.0), (1.0, 0.0), (0.5, 2.0)])
@pytest.mark.parametrize("shape", [(1, 2), (8, 10), (16, 100)])
def test_dkd_matches_mdistiller(standardize, tau, weights, shape):
    s, t, y = random_logits(shape[1] + int(tau), shape)
    loss = DistillationLoss("dkd", alpha=0.5, tau=tau, standardize=standardize, dkd_alpha=weights[0],
                            dkd_beta=weights[1])
    ours = loss(s, t, y).distill
    theirs = ref_dkd(s, t, y, tau, *weights, logit_stand=standardize)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 0.0), (0.0, 2.0), (0.5, 3.0)])
@pytest.mark.parametrize("shape", [(2, 3), (8, 10), (32, 100)])
def test_dist_matches_authors_code(tau, weights, shape):
    s, t, _ = random_logits(shape[0] + int(tau * 10), shape)
    ours = DistillationLoss("dist", alpha=0.5, tau=tau, dist_beta=weights[0], dist_gamma=weights[1])
    assert ours(s, t, torch.zeros(shape[0], dtype=torch.long)).distill.item() == pytest.approx(
        ref_dist(s, t, *weights, tau).item(), rel=1e-5, abs=1e-6
    )


@pytest.mark.parametrize("tau", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("kl_reduction", ["batchmean", "deit"])
def test_standardised_soft_matches_authors_kd_loss(tau, kl_reduction):
    s, t, y = random_logits(7, (12, 20), scale=5.0)
    ours = DistillationLoss("soft", alpha=0.5, tau=tau, kl_reduction=kl_reduction, standardize=True)(s, t, y)
    theirs = ref_kd(s, t, tau, logit_stand=True) / (20 if kl_reduction == "deit" else 1)
    assert ours.distill.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-7)


# ------------------------------------------------------------------------------- properties
def test_dkd_with_beta_zero_is_tckd_alone_and_terms_add_linearly():
    s, t, y = random_logits(11, (6, 7))
    tckd = ref_dkd_parts(s, t, y, 4.0)[0]
    nckd = ref_dkd_parts(s, t, y, 4.0)[1]

    def dkd(a, b):
        return DistillationLoss("dkd", tau=4.0, dkd_alpha=a, dkd_beta=b)(s, t, y).distill.item()

    assert dkd(1.0, 0.0) == pytest.approx(tckd.item(), rel=1e-5)
    assert dkd(0.0, 1.0) == pytest.approx(nckd.item(), rel=1e-5)
    assert dkd(2.0, 5.0) == pytest.approx(2 * dkd(1.0, 0.0) + 5 * dkd(0.0, 1.0), rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_dkd_recomposes_classic_kd_per_sample(tau):
    """DKD's Eq. (4): for one sample, KD = TCKD + (1 - p_t(target)) * NCKD."""
    s, t, y = random_logits(13, (5, 9))
    for i in range(5):
        si, ti, yi = s[i : i + 1], t[i : i + 1], y[i : i + 1]
        weight = 1.0 - (ti / tau).softmax(1)[0, yi[0]].item()
        dkd = DistillationLoss("dkd", tau=tau, dkd_alpha=1.0, dkd_beta=weight)(si, ti, yi).distill
        kd = DistillationLoss("soft", tau=tau)(si, ti, yi).distill
        assert dkd.item() == pytest.approx(kd.item(), rel=1e-5, abs=1e-7)


def test_dkd_uses_the_ground_truth_class():
    s, t, y = fixed4()
    loss = DistillationLoss("dkd", tau=4.0)
    other = (y + 1) % 5
    assert abs(loss(s, t, other).distill.item() - DKD_T4) > 1e-2
    # and the teacher logits: identical student and teacher give zero
    assert loss(t, t, y).distill.item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_soft_targets_use_their_argmax():
    s, t, y = fixed4()
    one_hot = F.one_hot(y, 5).float()
    mixed = 0.6 * one_hot + 0.4 * one_hot.roll(1, dims=0)  # mixup with lam 0.6: argmax is y
    loss = DistillationLoss("dkd", alpha=0.3, tau=4.0)
    terms = loss(s, t, mixed)
    assert terms.distill.item() == approx(DKD_T4)
    assert terms.ce.item() == pytest.approx(-(mixed * s.log_softmax(1)).sum(1).mean().item(), rel=1e-6)
    flipped = 0.4 * one_hot + 0.6 * one_hot.roll(1, dims=0)  # the other class dominates
    assert loss(s, t, flipped).distill.item() == pytest.approx(
        loss(s, t, y.roll(1, dims=0)).distill.item(), rel=1e-6
    )
    # the function itself, called with soft targets (the loss passes it classes)
    from distill.losses import dkd_distillation

    assert dkd_distillation(s, t, mixed, 4.0, 1.0, 8.0).item() == approx(dkd_distillation(s, t, y, 4.0, 1.0, 8.0).item())
    assert dkd_distillation(s, t, flipped, 4.0, 1.0, 8.0).item() == approx(
        dkd_distillation(s, t, y.roll(1, dims=0), 4.0, 1.0, 8.0).item())


@pytest.mark.parametrize("mode", ["soft", "dkd", "dist"])
def test_standardised_terms_ignore_shift_and_positive_scale(mode):
    """Z-scoring removes each sample's mean and scale: shifting and scaling teacher or student logits
    per sample by a positive factor leaves the standardised term unchanged (std 1e-7 aside)."""
    s, t, y = random_logits(17, (8, 10))
    g = torch.Generator().manual_seed(18)
    shift = torch.randn(8, 1, generator=g, dtype=torch.float64) * 5
    scale = torch.rand(8, 1, generator=g, dtype=torch.float64) * 4 + 0.25
    loss = DistillationLoss(mode, tau=2.0, standardize=True)
    base = loss(s, t, y).distill.item()
    assert loss(s, t * scale + shift, y).distill.item() == pytest.approx(base, rel=1e-5, abs=1e-6)
    assert loss(s * scale + shift, t, y).distill.item() == pytest.approx(base, rel=1e-5, abs=1e-6)
    # without standardisation the scale matters
    plain = DistillationLoss(mode, tau=2.0)
    assert abs(plain(s, t * scale + shift, y).distill.item() - plain(s, t, y).distill.item()) > 1e-3


def test_standardised_logits_have_zero_mean_and_unit_unbiased_std():
    from distill.losses import standardize_logits

    z = random_logits(19, (4, 12))[0] * 7 + 3
    n = standardize_logits(z)
    torch.testing.assert_close(n.mean(1), torch.zeros(4, dtype=z.dtype), atol=1e-9, rtol=0)
    torch.testing.assert_close(n.std(1), torch.ones(4, dtype=z.dtype), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["soft", "dkd", "dist"])
def test_standardised_terms_are_finite_for_constant_logits(mode):
    """A zero-initialised head gives constant logits (std 0): the 1e-7 in the authors' denominator maps
    them to zeros instead of 0/0, and the gradient stays finite."""
    z = torch.zeros(4, 5, requires_grad=True)
    t, y = torch.tensor(T4[:4]), torch.tensor(Y4)
    terms = DistillationLoss(mode, tau=2.0, standardize=True)(z, t, y)
    assert torch.isfinite(terms.distill)
    terms.total.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_dist_is_invariant_to_per_sample_shifts_not_to_scale():
    s, t, y = random_logits(23, (8, 10))
    g = torch.Generator().manual_seed(24)
    shift_s, shift_t = (torch.randn(8, 1, generator=g, dtype=torch.float64) * 10 for _ in range(2))
    loss = DistillationLoss("dist", tau=1.0)
    base = loss(s, t, y).distill.item()
    assert loss(s + shift_s, t + shift_t, y).distill.item() == pytest.approx(base, rel=1e-5, abs=1e-7)
    assert abs(loss(s, t * 3, y).distill.item() - base) > 1e-3
    assert loss(t, t, y).distill.item() == pytest.approx(0.0, abs=1e-6)  # perfect correlation


def test_dist_intra_term_needs_a_batch():
    """One sample: every class column is constant, so the intra term is exactly 1 (the authors' code)."""
    s, t, y = fixed4()
    one = DistillationLoss("dist", tau=1.0, dist_beta=0.0, dist_gamma=1.0)(s[:1], t[:1], y[:1]).distill
    assert one.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("mode", ["dkd", "dist"])
def test_new_modes_single_tensor_student_and_heads(mode):
    s, t, y = random_logits(29, (6, 5))
    other = random_logits(30, (6, 5))[0]
    loss = DistillationLoss(mode, alpha=0.5, tau=2.0)
    single, pair = loss(s, t, y), loss((s, s), t, y)
    for a, b in zip(single, pair):
        assert a.item() == pytest.approx(b.item(), rel=1e-7)
    terms = loss((other, s), t, y)  # the teacher term reads the distillation head
    assert terms.distill.item() == pytest.approx(single.distill.item(), rel=1e-7)
    assert terms.ce.item() == pytest.approx(F.cross_entropy(other, y).item(), rel=1e-6)


# ------------------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("mode,standardize", [("dkd", False), ("dkd", True), ("dist", False), ("dist", True),
                                              ("soft", True)])
@pytest.mark.parametrize("tau", [0.1, 1.0, 4.0])
def test_new_terms_bf16_autocast_gradients_are_finite(mode, standardize, tau):
    g = torch.Generator().manual_seed(0)
    B, D, C = 16, 8, 10
    features = torch.randn(B, D, generator=g)
    w_cls = (torch.randn(D, C, generator=g) * 40).requires_grad_()  # logits of magnitude ~100
    w_dist = (torch.randn(D, C, generator=g) * 40).requires_grad_()
    teacher_logits = (torch.randn(B, C, generator=g) * 200).bfloat16()  # very sharp teacher
    y = torch.randint(0, C, (B,), generator=g)
    loss = DistillationLoss(mode, alpha=0.5, tau=tau, standardize=standardize)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_cls, z_dist = features @ w_cls, features @ w_dist
        assert z_dist.dtype == torch.bfloat16
        terms = loss((z_cls, z_dist), teacher_logits, y)
    assert terms.distill.dtype == torch.float32
    assert torch.isfinite(terms.total) and torch.isfinite(terms.distill)
    terms.total.backward()
    for w in (w_cls, w_dist):
        assert w.grad is not None and torch.isfinite(w.grad).all()
    assert w_dist.grad.abs().sum() > 0
    ref = loss((z_cls.detach().float(), z_dist.detach().float()), teacher_logits.float(), y)
    assert terms.total.item() == pytest.approx(ref.total.item(), rel=1e-4, abs=1e-4)


def test_dkd_stays_finite_where_the_reference_log_of_probabilities_does_not():
    """A saturated student softmax: mdistiller's `torch.log(sum of probabilities)` gives log(0) and an
    infinite TCKD; the log-sum-exp form gives the finite limit."""
    s = torch.tensor([[200.0, 0.0, 0.0]])  # p_s(others) underflows to 0 in float32
    t = torch.tensor([[0.0, 1.0, 0.0]])
    y = torch.tensor([0])
    assert not torch.isfinite(ref_dkd(s, t, y, 1.0, 1.0, 0.0))
    ours = DistillationLoss("dkd", tau=1.0, dkd_beta=0.0)(s, t, y).distill
    expected = ref_dkd(s.double(), t.double(), y, 1.0, 1.0, 0.0)
    assert torch.isfinite(ours) and ours.item() == pytest.approx(expected.item(), rel=1e-5)


# ----------------------------------------------------------------------------------- warm-up
def test_dkd_warmup_ramps_the_distillation_weight():
    s, t, y = fixed4()
    loss = DistillationLoss("dkd", alpha=0.3, tau=4.0, dkd_warmup_epochs=20)
    ce = F.cross_entropy(s, y).item()
    for epoch, factor in [(0, 1 / 20), (4, 5 / 20), (18, 19 / 20), (19, 1.0), (50, 1.0), (9.5, 10.5 / 20)]:
        loss.set_epoch(epoch)
        assert loss.warmup_factor == pytest.approx(factor)
        terms = loss(s, t, y)
        assert terms.distill.item() == approx(DKD_T4)  # the logged term stays unweighted
        assert terms.total.item() == approx(0.7 * ce + 0.3 * factor * DKD_T4)


def test_dkd_warmup_without_epoch_is_an_error_and_off_by_default():
    s, t, y = fixed4()
    with pytest.raises(RuntimeError, match="set_epoch"):
        DistillationLoss("dkd", dkd_warmup_epochs=5)(s, t, y)
    assert DistillationLoss("dkd").warmup_factor == 1.0
    # the warm-up is DKD's: other modes ignore it
    soft = DistillationLoss("soft", dkd_warmup_epochs=5)
    assert soft.warmup_factor == 1.0
    assert soft(s, t, y).total.item() == pytest.approx(DistillationLoss("soft")(s, t, y).total.item())


@pytest.mark.parametrize("epoch", [-1, math.nan, "3", True])
def test_set_epoch_rejects_bad_values(epoch):
    with pytest.raises(ValueError, match="epoch"):
        DistillationLoss("dkd", dkd_warmup_epochs=5).set_epoch(epoch)


# ------------------------------------------------------------------------------ API, validation
@pytest.mark.parametrize("mode", ["none", "soft", "hard", "dkd", "dist"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_needs_teacher_for_every_mode(mode, alpha):
    loss = DistillationLoss(mode, alpha=alpha)
    assert loss.needs_teacher == (mode != "none" and alpha > 0)
    s, t, y = fixed4()
    if not loss.needs_teacher:  # and it really runs without one
        assert loss(s, None, y).total.item() == approx(F.cross_entropy(s, y).item())
    else:
        with pytest.raises(ValueError, match="teacher_logits"):
            loss(s, None, y)


def test_new_config_round_trips():
    loss = DistillationLoss("dkd", alpha=0.4, tau=2.0, standardize=True, dkd_alpha=2.0, dkd_beta=4.0,
                            dkd_warmup_epochs=20, dist_beta=0.5, dist_gamma=2.0)
    again = DistillationLoss(**loss.config())
    assert again.config() == loss.config()
    assert loss.config()["dkd_warmup_epochs"] == 20 and loss.config()["standardize"] is True
    assert "dkd_beta=4.0" in repr(loss) and "standardize=True" in repr(loss)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(mode="DKD"), "mode"),
        (dict(standardize="yes"), "standardize"),
        (dict(standardize=1), "standardize"),
        (dict(mode="hard", standardize=True), "standardize"),
        (dict(dkd_alpha=-1.0), "dkd_alpha"),
        (dict(dkd_alpha=math.inf), "dkd_alpha"),
        (dict(dkd_beta=math.nan), "dkd_beta"),
        (dict(dkd_beta="8"), "dkd_beta"),
        (dict(dkd_warmup_epochs=-1), "dkd_warmup_epochs"),
        (dict(dkd_warmup_epochs=2.5), "dkd_warmup_epochs"),
        (dict(dist_beta=-0.5), "dist_beta"),
        (dict(dist_gamma=math.nan), "dist_gamma"),
        (dict(mode="dkd", dkd_alpha=0.0, dkd_beta=0.0), "dkd_alpha"),
        (dict(mode="dist", dist_beta=0.0, dist_gamma=0.0), "dist_beta"),
    ],
)
def test_new_invalid_arguments_name_the_field_in_one_line(kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b") as info:
        DistillationLoss(**kwargs)
    assert "\n" not in str(info.value)


def test_dist_settings_that_reproduce_the_authors_one_to_two_weighting():
    """DIST's configs: `ori_loss_weight 1 * CE + kd_loss_weight 2 * DIST(beta=1, gamma=1)`; here
    total = (1 - alpha) * CE + alpha * (dist_beta * inter + dist_gamma * intra)."""
    g = torch.Generator().manual_seed(0)
    s_cls, s_dist, t = (torch.randn(8, 10, generator=g, dtype=torch.float64) for _ in range(3))
    y = torch.randint(0, 10, (8,), generator=g)
    plain = DistillationLoss("dist", alpha=0.5, tau=4.0)((s_cls, s_dist), t, y)
    authors = plain.ce + 2 * plain.distill
    two_thirds = DistillationLoss("dist", alpha=2 / 3, tau=4.0)((s_cls, s_dist), t, y).total
    doubled = DistillationLoss("dist", alpha=0.5, tau=4.0, dist_beta=2.0, dist_gamma=2.0)((s_cls, s_dist), t, y).total
    assert two_thirds.item() == pytest.approx(authors.item() / 3, rel=1e-6)  # float32 inside
    assert doubled.item() == pytest.approx(authors.item() / 2, rel=1e-6)
    assert plain.total.item() == pytest.approx((plain.ce + plain.distill).item() / 2, rel=1e-6)  # 1:1, not 1:2


# ==================================================================================================
# The stronger losses inside a DistillModule fit
# ==================================================================================================
# (loss settings, the authors' formula of the distillation term on (z_dist, z_teacher, y) in float64)
FIT_LOSSES = {
    "dkd": (dict(mode="dkd", alpha=0.5, tau=4.0, dkd_alpha=1.0, dkd_beta=8.0, dkd_warmup_epochs=3),
            lambda s, t, y: ref_dkd(s, t, y, 4.0, 1.0, 8.0)),
    "dist": (dict(mode="dist", alpha=0.5, tau=4.0, dist_beta=1.0, dist_gamma=2.0),
             lambda s, t, y: ref_dist(s, t, 1.0, 2.0, 4.0)),
    "ls": (dict(mode="soft", alpha=0.9, tau=2.0, standardize=True), lambda s, t, y: ref_kd(s, t, 2.0, True)),
}


@pytest.mark.parametrize("name", sorted(FIT_LOSSES))
def test_stronger_losses_in_a_distill_module_fit(name, trainer_factory, tiny_teacher_ckpt, tiny_student):
    """DKD, DIST and KL on standardised logits as a DistillModule trains with them: at each step the loss
    gets the student's two heads in order, the live teacher's logits on the batch and the labels; its
    distillation term is the authors' formula on them, and DKD's warm-up (3 epochs) weighs it 1/3, 2/3,
    1 in epochs 0, 1, 2 (`on_train_epoch_start` -> `loss.set_epoch`). Two batches an epoch, so that the
    epoch and the step count differ: a warm-up read from the step would weigh epoch 1 by 3/3."""
    import lightning as L

    from distill import DistillModule, ImageDataModule, StudentConfig
    from helpers.probes import LossInputs

    settings, reference = FIT_LOSSES[name]
    module = DistillModule(StudentConfig(**tiny_student), teacher=str(tiny_teacher_ckpt), warmup_epochs=0,
                           loss=DistillationLoss(**settings))
    heads = []

    class Heads(L.Callback):  # the student's (z_cls, z_dist) on the batch, before the step changes the weights
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with torch.no_grad():
                heads.append(pl_module.student(batch[0]))

    seen = LossInputs()
    trainer_factory(max_epochs=3, limit_train_batches=2, limit_val_batches=0, callbacks=[Heads(), seen]).fit(
        module, ImageDataModule("digits", img_size=8, batch_size=32))
    assert len(seen.calls) == len(heads) == 6
    alpha = settings["alpha"]
    for step, (call, (x, y), (z_cls, z_dist)) in enumerate(zip(seen.calls, seen.batches, heads)):
        epoch = step // 2
        assert isinstance(call["student"], tuple)
        torch.testing.assert_close(call["student"][0], z_cls, msg=f"epoch {epoch}: class head")
        torch.testing.assert_close(call["student"][1], z_dist, msg=f"epoch {epoch}: distillation head")
        torch.testing.assert_close(call["teacher"], module.teacher(x).float())
        assert torch.equal(call["target"], y)
        terms = call["terms"]
        expected = reference(z_dist.double(), call["teacher"].double(), y)
        # float32 in the module, float64 here: near-equal distributions (an untrained student) cancel digits
        torch.testing.assert_close(terms.distill.double(), expected, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(terms.ce, F.cross_entropy(z_cls.float(), y))
        w = min((epoch + 1) / 3, 1.0) if name == "dkd" else 1.0
        torch.testing.assert_close(terms.total, (1 - alpha) * terms.ce + alpha * w * terms.distill,
                                   msg=f"epoch {epoch}: warm-up factor {w}")
