"""DeiT's distillation loss: ground-truth cross-entropy on the class head plus a teacher term on the
distillation head. The teacher term is DeiT's hard or soft (KL) term, or one of two stronger logit
losses, DKD and DIST, optionally on z-scored ("standardised") logits."""
from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

Mode = Literal["none", "soft", "hard", "dkd", "dist"]
KLReduction = Literal["batchmean", "deit"]
MODES = ("none", "soft", "hard", "dkd", "dist")

# DKD's masking constant (mdistiller): subtracting it from the target-class logit removes that class
# from the softmax over the non-target classes. Kept as the authors wrote it so values match theirs.
DKD_MASK = 1000.0


UNLABELED = -1  # the label of an unlabelled image (cross_entropy's ignore_index convention)


class LossTerms(NamedTuple):
    """What `DistillationLoss` returns: the weighted total, the two unweighted terms and the share of
    the batch's images that had a ground-truth term (`labeled_fraction`, 1 without unlabelled images)."""

    total: torch.Tensor
    ce: torch.Tensor
    distill: torch.Tensor
    labeled_fraction: torch.Tensor | None = None


def labeled_rows(target: torch.Tensor) -> torch.Tensor:
    """Which samples of a batch have a label: class indices `(B,)` >= 0 (unlabelled images are -1), or
    soft targets `(B, C)` whose row is not all zeros (a mixed image with an unlabelled part has no
    ground-truth target: `distill.data.unlabeled.UnlabeledMixup`)."""
    return target >= 0 if target.ndim == 1 else target.sum(dim=-1) > 0


CEReduction = Literal["labeled", "batch"]
CE_REDUCTIONS = ("labeled", "batch")


def ground_truth_term(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
                      reduction: str = "labeled") -> torch.Tensor:
    """Cross-entropy with the ground truth over the labelled samples of the batch only; 0 (with a gradient
    of zeros, never NaN) for a batch without any. `reduction`: `labeled` averages over the labelled samples
    (the term keeps its weight however few they are), `batch` sums over them and divides by the batch size
    (each labelled sample weighs as much as any sample of the teacher term; the term shrinks with the
    labelled share). With every sample labelled both are exactly `F.cross_entropy(logits, target,
    label_smoothing=...)`, bit for bit. No host synchronisation."""
    logits = logits.float()
    labeled = labeled_rows(target)
    if target.ndim == 1 and reduction == "labeled":
        ce = F.cross_entropy(logits, target, ignore_index=UNLABELED, label_smoothing=label_smoothing)
        return torch.where(labeled.any(), ce, ce.new_zeros(()))  # the mean over no sample is NaN
    if target.ndim == 1:  # reduction "batch"
        total = F.cross_entropy(logits, target, ignore_index=UNLABELED, label_smoothing=label_smoothing, reduction="sum")
        every = F.cross_entropy(logits, target.clamp(min=0), label_smoothing=label_smoothing)  # all labelled: as always
        return torch.where(labeled.all(), every, total / max(len(target), 1))
    rows = F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    count = labeled.sum().clamp(min=1) if reduction == "labeled" else torch.tensor(float(max(len(rows), 1)))
    masked = (rows * labeled).sum() / count
    every = F.cross_entropy(logits, target, label_smoothing=label_smoothing)  # the same value, as it always was
    return torch.where(labeled.all(), every, masked)


def _no_autocast(t: torch.Tensor):
    """Every teacher term runs in float32: under bf16 autocast a softmax of sharp teacher logits
    underflows to exact zeros, `p * log p` turns into NaN and Pearson sums lose their digits."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def standardize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Z-score each sample's logits, `(z - mean) / (1e-7 + std)` over the classes with the unbiased std
    (Sun et al., CVPR 2024, `normalize` in their code). Student and teacher then differ only in how they
    rank and space the classes, not in logit range: the student no longer has to match the teacher's
    magnitude, only its relations."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (1e-7 + std)


def soft_distillation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tau: float = 1.0,
    kl_reduction: KLReduction = "batchmean",
    standardize: bool = False,
) -> torch.Tensor:
    """`tau**2 * KL(softmax(z_t / tau) || softmax(z_s / tau))`, summed over the batch and divided by the
    batch size (`batchmean`, Hinton/timm) or by batch x classes (`deit`, the DeiT reference code).

    With `standardize`, `z_s` and `z_t` are first z-scored per sample (`standardize_logits`); `tau` is
    then a "base temperature" on unit-variance logits and the `tau**2` factor stays, as in the authors'
    `kd_loss` (they use tau 2-3 and a larger KD weight with it).

    Always computed in float32 with log-probabilities on both sides (`log_target=True`): under bf16
    autocast a softmax of sharp teacher logits underflows to exact zeros and `p * log p` turns into NaN.
    """
    with _no_autocast(student_logits):
        s, t = student_logits.float(), teacher_logits.float()
        if standardize:
            s, t = standardize_logits(s), standardize_logits(t)
        log_p_s = F.log_softmax(s / tau, dim=-1)
        log_p_t = F.log_softmax(t / tau, dim=-1)
        kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    denominator = student_logits.numel() if kl_reduction == "deit" else student_logits.shape[0]
    return kl * (tau * tau) / denominator


def hard_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the teacher's argmax label (DeiT's hard distillation, no smoothing)."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1))


def dkd_distillation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    tau: float = 4.0,
    tckd_weight: float = 1.0,
    nckd_weight: float = 8.0,
    standardize: bool = False,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): `tckd_weight * TCKD + nckd_weight * NCKD`.

    TCKD is the KL between the binary (target class, all other classes) probabilities of teacher and
    student; NCKD the KL between their distributions over the non-target classes alone. Classic KD
    couples NCKD to the teacher's confidence `1 - p_t(target)`; DKD weighs it on its own. Both terms are
    summed over the batch, divided by the batch size and multiplied by `tau**2`, and the non-target
    softmax subtracts 1000.0 from the target logit (after dividing by `tau`), exactly as
    mdistiller's `dkd_loss`. One deliberate difference in arithmetic, not in value: the binary
    log-probabilities come from the log-odds `z_target - logsumexp(z_others)` through `logsigmoid`
    instead of `log(sum of softmax)`, so a saturated softmax gives a finite loss where the reference
    gives `log(0)`.

    `target` is the ground-truth class `(B,)`; soft targets `(B, C)` from mixup/cutmix are reduced to
    their argmax (the dominant class of the mix), since DKD splits the classes by one target class.
    `standardize` z-scores both logits first (Sun et al.'s DKD+LS).
    """
    with _no_autocast(student_logits):
        s, t = student_logits.float(), teacher_logits.float()
        if standardize:
            s, t = standardize_logits(s), standardize_logits(t)
        if target.ndim == 2:
            target = target.argmax(dim=-1)
        index = target.reshape(-1, 1).long()
        gt = torch.zeros_like(s, dtype=torch.bool).scatter_(1, index, True)
        s, t = s / tau, t / tau
        batch = s.shape[0]

        def binary_log_probs(z: torch.Tensor) -> torch.Tensor:  # log [p(target), p(others)], (B, 2)
            # Through the log-odds: the two probabilities then sum to 1 to rounding, so float32 errors
            # in the log-sum-exps cancel to first order in the KL instead of adding up.
            log_odds = z.gather(1, index) - z.masked_fill(gt, -math.inf).logsumexp(dim=1, keepdim=True)
            return torch.cat([F.logsigmoid(log_odds), F.logsigmoid(-log_odds)], dim=1)

        tckd = F.kl_div(binary_log_probs(s), binary_log_probs(t), reduction="sum", log_target=True)
        masked = DKD_MASK * gt.float()
        nckd = F.kl_div(
            F.log_softmax(s - masked, dim=1), F.log_softmax(t - masked, dim=1), reduction="sum", log_target=True
        )
        scale = tau * tau / batch
        return tckd_weight * tckd * scale + nckd_weight * nckd * scale


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of `a` with the same row of `b` (DIST's `pearson_correlation`:
    cosine similarity of the centred rows, `eps` added to the product of the norms)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_distillation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tau: float = 1.0,
    inter_weight: float = 1.0,
    intra_weight: float = 1.0,
    standardize: bool = False,
) -> torch.Tensor:
    """DIST (Huang et al., NeurIPS 2022): `tau**2 * (inter_weight * inter + intra_weight * intra)` on
    `softmax(z / tau)`, where `inter = 1 - mean over samples of Pearson(student row, teacher row)` (the
    classes' relation within a sample) and `intra = 1 - mean over classes of Pearson(student column,
    teacher column)` (how a class's probability varies across the batch), as the authors' `DIST` in
    image_classification_sota `lib/models/losses/dist_kd.py`.

    Matching correlations instead of the exact distribution lets a student keep its own scale and offset
    of probabilities when the teacher is much stronger. The intra term needs a batch: with one sample
    every column is constant and the term is 1 with no gradient. Softmax ignores per-sample shifts of
    the logits, so DIST does too. `standardize` z-scores both logits first (not evaluated by either
    paper; Sun et al. only pair standardisation with KL-based losses).
    """
    with _no_autocast(student_logits):
        s, t = student_logits.float(), teacher_logits.float()
        if standardize:
            s, t = standardize_logits(s), standardize_logits(t)
        y_s = (s / tau).softmax(dim=1)
        y_t = (t / tau).softmax(dim=1)
        inter = 1.0 - _pearson_rows(y_s, y_t).mean()
        intra = 1.0 - _pearson_rows(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean()
        return tau * tau * (inter_weight * inter + intra_weight * intra)


def _non_negative(name: str, value: float, meaning: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"DistillationLoss: {name}={value!r} must be a finite number >= 0 ({meaning})")
    return float(value)


class DistillationLoss(nn.Module):
    """DeiT's loss, `total = (1 - alpha) * CE(z_cls, target) + alpha * w * distill(z_dist, z_t)`.

    `alpha` is the weight of the distillation term, exactly as in DeiT (`distillation_alpha`); `w` is 1
    except during DKD's warm-up (`dkd_warmup_epochs`).

    Args:
        mode: the teacher term. `hard` (CE against the teacher's argmax), `soft` (temperature-scaled
            KL, Hinton/DeiT), `dkd` (Decoupled KD, Zhao et al. 2022: `dkd_alpha * TCKD + dkd_beta *
            NCKD`, needs the ground-truth class), `dist` (DIST, Huang et al. 2022: Pearson-correlation
            relations, `dist_beta * inter + dist_gamma * intra`) or `none` (ground truth only: total is
            the CE term and `alpha` is not used).
        alpha: weight of the distillation term, in [0, 1]. DKD's configs (mdistiller) add their term to
            a CE of weight 1: `alpha=0.5` keeps that 1:1 ratio at half the loss scale. DIST's configs
            weight CE:DIST as 1:2 (`ori_loss_weight: 1`, `kd_loss_weight: 2`, beta = gamma = 1):
            `alpha=2/3` gives `(CE + 2 DIST) / 3`, or `alpha=0.5` with `dist_beta = dist_gamma = 2` gives
            `(CE + 2 DIST) / 2`; `alpha=0.5` with the default weights is 1:1, half the authors' weight.
        tau: temperature of the soft, dkd and dist terms, > 0; every one is multiplied by `tau**2`.
            Typical: 3.0 for DeiT's soft term, 4.0 for DKD (their CIFAR configs), 1.0 (ImageNet) or 4.0
            (CIFAR) for DIST, 2-3 with `standardize`.
        kl_reduction: `soft` only. `batchmean` (default; divide the summed KL by the batch size, as
            Hinton's KD and timm do) or `deit` (divide by batch x classes, as DeiT's reference code
            does, i.e. `batchmean / num_classes`). DKD always divides by the batch size, as its authors.
        label_smoothing: smoothing of the ground-truth term only; the teacher term is never smoothed.
        ce_reduction: with unlabelled images in the batch, `labeled` (default) averages the ground-truth
            term over the labelled samples; `batch` sums it over them and divides by the batch size, so a
            labelled sample weighs as much as any other and the term shrinks with the labelled share
            (`ground_truth_term`). Identical when every sample is labelled.
        standardize: z-score student and teacher logits per sample before the temperature softmax
            (Logit Standardization, Sun et al., CVPR 2024). Applies to `soft`, `dkd` and `dist`; an
            error with `hard` (the argmax ignores it); ignored by `none`.
        dkd_alpha: `dkd` only; weight of TCKD (target vs non-target binary KL), >= 0. DKD's default 1.
        dkd_beta: `dkd` only; weight of NCKD (KL among the non-target classes), >= 0. DKD's default 8.
        dkd_warmup_epochs: `dkd` only; ramp the distillation term up linearly as DKD does,
            `w = min((epoch + 1) / dkd_warmup_epochs, 1)` for the 0-based epoch given to `set_epoch`
            (mdistiller counts epochs from 1, hence the `+ 1`). 0 (default) turns it off; DKD's configs
            use 20. With it on, call `set_epoch` at the start of every training epoch.
        dist_beta: `dist` only; weight of the inter-class relation term, >= 0 (DIST's default 1).
        dist_gamma: `dist` only; weight of the intra-class relation term, >= 0 (DIST's default 1).

    Called as `loss(student_out, teacher_logits, target)`, where `student_out` is `(z_cls, z_dist)` for a
    student with a distillation token or a single tensor for one without (classic Hinton KD: both
    terms read the same logits), and `target` holds class indices `(B,)` or soft targets `(B, C)`
    from mixup/cutmix (`dkd` uses their argmax as the target class). Returns `LossTerms(total, ce,
    distill, labeled_fraction)`; `distill` is the unweighted teacher term (no `alpha`, no warm-up factor).

    Unlabelled images (`data.unlabeled_root`, `data.labels_per_class`) have target -1 (a soft target row
    of zeros after mixup: a mixed image keeps its ground truth only when both of its images are
    labelled). The ground-truth term is the mean over the labelled samples of the batch (0 for a batch
    without any, `ground_truth_term`); the teacher term covers every sample. So `alpha` weighs the
    teacher term on every image against the ground-truth term on the labelled ones; with few labels,
    the CE term is a mean over few samples and keeps its full `1 - alpha` weight. DKD, which splits the
    classes by a target class, takes the teacher's argmax as the target of an unlabelled sample.
    """

    def __init__(
        self,
        mode: Mode = "hard",
        alpha: float = 0.5,
        tau: float = 1.0,
        kl_reduction: KLReduction = "batchmean",
        label_smoothing: float = 0.0,
        standardize: bool = False,
        dkd_alpha: float = 1.0,
        dkd_beta: float = 8.0,
        dkd_warmup_epochs: int = 0,
        dist_beta: float = 1.0,
        dist_gamma: float = 1.0,
        ce_reduction: CEReduction = "labeled",
    ) -> None:
        super().__init__()
        if ce_reduction not in CE_REDUCTIONS:
            raise ValueError(f"DistillationLoss: ce_reduction={ce_reduction!r} is unknown; use 'labeled' (the mean over "
                             f"the labelled samples) or 'batch' (their sum over the batch size)")
        if mode not in MODES:
            raise ValueError(f"DistillationLoss: mode={mode!r} is unknown; use one of {', '.join(MODES)}")
        if kl_reduction not in ("batchmean", "deit"):
            raise ValueError(
                f"DistillationLoss: kl_reduction={kl_reduction!r} is unknown; use 'batchmean' or 'deit'"
            )
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"DistillationLoss: alpha={alpha} must lie in [0, 1] (the weight of the distillation term)")
        if not float(tau) > 0.0:
            raise ValueError(f"DistillationLoss: tau={tau} must be > 0 (the softmax temperature)")
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"DistillationLoss: label_smoothing={label_smoothing} must lie in [0, 1)")
        if not isinstance(standardize, bool):
            raise ValueError(f"DistillationLoss: standardize={standardize!r} must be true or false")
        if standardize and mode == "hard":
            raise ValueError("DistillationLoss: standardize=True does nothing for mode='hard' (the teacher's "
                             "argmax ignores it); use mode 'soft', 'dkd' or 'dist', or standardize=False")
        self.dkd_alpha = _non_negative("dkd_alpha", dkd_alpha, "the TCKD weight")
        self.dkd_beta = _non_negative("dkd_beta", dkd_beta, "the NCKD weight")
        self.dist_beta = _non_negative("dist_beta", dist_beta, "the inter-class relation weight")
        self.dist_gamma = _non_negative("dist_gamma", dist_gamma, "the intra-class relation weight")
        if isinstance(dkd_warmup_epochs, bool) or not isinstance(dkd_warmup_epochs, int) or dkd_warmup_epochs < 0:
            raise ValueError(f"DistillationLoss: dkd_warmup_epochs={dkd_warmup_epochs!r} must be an integer >= 0 "
                             f"(epochs of linear warm-up of the DKD term; 0 turns it off)")
        if mode == "dkd" and self.dkd_alpha == 0 and self.dkd_beta == 0:
            raise ValueError("DistillationLoss: dkd_alpha=0 and dkd_beta=0 leave no DKD term; "
                             "set one of them > 0 or use mode='none'")
        if mode == "dist" and self.dist_beta == 0 and self.dist_gamma == 0:
            raise ValueError("DistillationLoss: dist_beta=0 and dist_gamma=0 leave no DIST term; "
                             "set one of them > 0 or use mode='none'")
        self.mode = mode
        self.alpha = float(alpha)
        self.tau = float(tau)
        self.kl_reduction = kl_reduction
        self.label_smoothing = float(label_smoothing)
        self.ce_reduction = ce_reduction
        self.standardize = standardize
        self.dkd_warmup_epochs = dkd_warmup_epochs
        self._epoch: float | None = None

    @property
    def needs_teacher(self) -> bool:
        return self.mode != "none" and self.alpha > 0

    def config(self) -> dict:
        """The constructor arguments, for checkpoints and logs."""
        return dict(
            mode=self.mode,
            alpha=self.alpha,
            tau=self.tau,
            kl_reduction=self.kl_reduction,
            label_smoothing=self.label_smoothing,
            ce_reduction=self.ce_reduction,
            standardize=self.standardize,
            dkd_alpha=self.dkd_alpha,
            dkd_beta=self.dkd_beta,
            dkd_warmup_epochs=self.dkd_warmup_epochs,
            dist_beta=self.dist_beta,
            dist_gamma=self.dist_gamma,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    # ------------------------------------------------------------------------------------- warm-up
    def set_epoch(self, epoch: float) -> None:
        """Tell the loss the 0-based training epoch (Lightning's `current_epoch`, e.g. from
        `on_train_epoch_start`); only DKD's warm-up reads it. A fraction (`epoch + batch / batches`)
        gives a per-step ramp. Not saved: the caller sets it again each epoch, also after a resume."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or not (math.isfinite(epoch) and epoch >= 0):
            raise ValueError(f"DistillationLoss.set_epoch: epoch={epoch!r} must be a number >= 0")
        self._epoch = float(epoch)

    @property
    def warmup_factor(self) -> float:
        """The factor on the distillation term now: `min((epoch + 1) / dkd_warmup_epochs, 1)` during
        DKD's warm-up, 1 otherwise."""
        if self.mode != "dkd" or self.dkd_warmup_epochs == 0:
            return 1.0
        if self._epoch is None:
            raise RuntimeError(f"DistillationLoss: dkd_warmup_epochs={self.dkd_warmup_epochs} needs the current "
                               f"epoch; call loss.set_epoch(epoch) at the start of every training epoch")
        return min((self._epoch + 1.0) / self.dkd_warmup_epochs, 1.0)

    # ------------------------------------------------------------------------------------- forward
    def forward(
        self,
        student_out: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        teacher_logits: torch.Tensor | None,
        target: torch.Tensor,
    ) -> LossTerms:
        if isinstance(student_out, (tuple, list)):
            z_cls, z_dist = student_out
        else:
            z_cls = z_dist = student_out
        ce = ground_truth_term(z_cls, target, self.label_smoothing, self.ce_reduction)
        labeled = labeled_rows(target)
        fraction = labeled.float().mean()
        if self.mode == "none":
            return LossTerms(ce, ce, ce.new_zeros(()), fraction)
        if teacher_logits is None and self.alpha == 0.0:  # the teacher term weighs nothing: skip it
            return LossTerms(ce, ce, ce.new_zeros(()), fraction)
        if teacher_logits is None:
            raise ValueError(f"DistillationLoss(mode={self.mode!r}) needs teacher_logits; got None")
        if self.mode == "soft":
            distill = soft_distillation(z_dist, teacher_logits, self.tau, self.kl_reduction, self.standardize)
        elif self.mode == "dkd":
            target_class = target.argmax(dim=-1) if target.ndim == 2 else target
            target_class = torch.where(labeled, target_class, teacher_logits.argmax(dim=-1))
            distill = dkd_distillation(
                z_dist, teacher_logits, target_class, self.tau, self.dkd_alpha, self.dkd_beta, self.standardize
            )
        elif self.mode == "dist":
            distill = dist_distillation(
                z_dist, teacher_logits, self.tau, self.dist_beta, self.dist_gamma, self.standardize
            )
        else:
            distill = hard_distillation(z_dist, teacher_logits)
        total = (1.0 - self.alpha) * ce + (self.alpha * self.warmup_factor) * distill
        return LossTerms(total, ce, distill, fraction)
