"""The student's loss for every classification method, composed from the plain loss functions:

    loss = α · response + (1 − α) · CE(labels)
           + feature_weight · (hint or attention-transfer term)
           + rkd_distance · RKD-D + rkd_angle · RKD-A

response: Hinton KD (`losses.hinton_kd_loss`) or DKD (`decoupled_kd.dkd_loss`), against the
weighted teacher ensemble softened at the (scheduled, optionally per-sample) temperature.
RKD runs on the feature layers when they are named, else on the logits (the ensemble's mean logits).
The ensemble's weights are per teacher, or per teacher and row (`Distill.teacher_weighting`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kd_ops import decoupled_kd, feature_kd, losses, relation_kd
from kd_ops import teacher_weighting as tw
from kd_ops import temperature as temps

RESPONSES = ("hinton", "dkd")
FEATURE_KINDS = ("hint", "attention")


@dataclass(frozen=True)
class Distill:
    """A student's distillation settings: one type from the config's `distill` section (and each
    Tune trial's point) to the Train worker's loss. The ensemble (`teacher_weights`, per teacher,
    summing to 1), the response term at `temperature` mixed with the labels' CE by `alpha`, the
    classification method's own terms and, for LMs, the token-level divergence."""
    teacher_weights: tuple[float, ...]
    temperature: float
    alpha: float
    divergence: str = "forward_kl"      # LM: forward_kl | reverse_kl | jsd (kd_ops.token_losses)
    beta: float = 0.5                   # LM: JSD mixing weight
    tail: bool = True                   # LM top-k: a bucket for the teacher mass outside the top-k
    response: str = "hinton"            # hinton | dkd
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0
    schedule: str = "constant"          # constant | linear | cosine, from T to temperature_end
    temperature_end: float | None = None
    standardize: bool = False           # per-sample temperature by logit standardisation
    feature: str | None = None          # hint | attention (layers named in the Loop's features)
    feature_loss: str = "mse"           # hint: mse | cosine
    feature_weight: float = 0.0
    rkd_distance: float = 0.0
    rkd_angle: float = 0.0
    teacher_weighting: str = "static"   # static | entropy | correctness (kd_ops.teacher_weighting)

    def __post_init__(self):
        checks = [(self.response in RESPONSES, f"response must be one of {RESPONSES}, got {self.response!r}"),
                  (self.schedule in temps.SCHEDULES,
                   f"schedule must be one of {temps.SCHEDULES}, got {self.schedule!r}"),
                  (self.feature is None or self.feature in FEATURE_KINDS,
                   f"feature must be one of {FEATURE_KINDS} or null, got {self.feature!r}"),
                  (self.feature_loss in ("mse", "cosine"), f"feature_loss must be mse or cosine, got {self.feature_loss!r}"),
                  (self.teacher_weighting in tw.KINDS,
                   f"teacher_weighting must be one of {tw.KINDS}, got {self.teacher_weighting!r}"),
                  (self.dkd_alpha >= 0 and self.dkd_beta >= 0, "dkd alpha and beta must be >= 0"),
                  (min(self.feature_weight, self.rkd_distance, self.rkd_angle) >= 0, "loss weights must be >= 0"),
                  (self.temperature_end is None or self.temperature_end > 0, "temperature_end must be > 0"),
                  (self.temperature > 0 and 0 <= self.alpha <= 1, "temperature must be > 0 and alpha in [0, 1]")]
        for ok, text in checks:
            if not ok:
                raise ValueError(text)

    @property
    def uses_features(self) -> bool:
        return self.feature is not None and self.feature_weight > 0

    def method(self) -> dict:
        """The classification method's own settings (what the summary records as `method`)."""
        return {k: getattr(self, k) for k in METHOD_FIELDS}


METHOD_FIELDS = ("response", "dkd_alpha", "dkd_beta", "schedule", "temperature_end", "standardize", "feature",
                 "feature_loss", "feature_weight", "rkd_distance", "rkd_angle", "teacher_weighting")


def student_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 weights: torch.Tensor, d: Distill, *, progress: float = 0.0, student_features: torch.Tensor | None = None,
                 teacher_features: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """student_logits [B, C]; teacher_logits [M, B, C] raw; labels [B] (−1: unlabelled); weights [M]
    (`d.teacher_weights` as a tensor; `d.teacher_weighting` turns them into [M, B] per row); `d`:
    temperature, α and the method's terms;
    progress ∈ [0, 1] (for the schedule); student_features [B, ...] (projected for hint KD) and
    teacher_features [B, ...] when the method uses features. Returns (scalar loss, parts as floats)."""
    t = temps.scheduled(d.temperature, d.temperature_end, d.schedule, progress)
    s_logits, t_logits = student_logits, teacher_logits
    if d.standardize:
        s_logits, t_logits = temps.standardize(student_logits), temps.standardize(teacher_logits)
    # per-row weights from the raw logits (not standardised or softened): confidence and correctness
    # are the teachers' own
    row_weights = (weights if d.teacher_weighting == "static" else
                   tw.per_sample_weights(teacher_logits, weights, d.teacher_weighting, labels))
    p = losses.ensemble_probs(t_logits, row_weights, t)
    if d.response == "dkd":
        response = decoupled_kd.dkd_loss(s_logits, p, decoupled_kd.targets(labels, p), temperature=t,
                                         alpha=d.dkd_alpha, beta=d.dkd_beta)
    else:
        response = losses.hinton_kd_loss(s_logits, p, t)
    ce = losses.hard_label_loss(student_logits, labels)
    loss = losses.mix(response, ce, d.alpha)
    parts = {"response": float(response.detach()), "ce": float(ce.detach()), "temperature": t}
    if d.uses_features:
        if student_features is None or teacher_features is None:
            raise ValueError(f"feature method {d.feature!r} needs student and teacher features")
        f = (feature_kd.hint_loss(student_features, teacher_features, d.feature_loss) if d.feature == "hint"
             else feature_kd.attention_loss(student_features, teacher_features))
        loss = loss + d.feature_weight * f
        parts["feature"] = float(f.detach())
    if d.rkd_distance or d.rkd_angle:
        s_emb, t_emb = ((student_features, teacher_features) if teacher_features is not None
                        else (student_logits, torch.einsum("m,mbc->bc", weights, teacher_logits.float())))
        if d.rkd_distance:
            dist = relation_kd.rkd_distance_loss(s_emb, t_emb)
            loss, parts["rkd_distance"] = loss + d.rkd_distance * dist, float(dist.detach())
        if d.rkd_angle:
            a = relation_kd.rkd_angle_loss(s_emb, t_emb)
            loss, parts["rkd_angle"] = loss + d.rkd_angle * a, float(a.detach())
    return loss, parts
